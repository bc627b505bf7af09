"""A FHIR REST endpoint that acknowledges every write at once: a measuring device for R1, never a test double.

R1 asks how fast normalize -> identity -> order -> sink move records when the target costs nothing. This
server answers PUT, POST, DELETE and GET (also inside batch and transaction bundles) with 200/201/204 and an
ETag, keeps the last body and version of every resource so a read answers what was written, and notes
when it acknowledged each resource. It validates nothing and enforces no referential integrity, so it
is never used by the tests (DESIGN.md decision 1: tests use the real FHIR server).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

__all__ = ["AckLog", "InstantAckServer", "apply_write"]

_FHIR_JSON = "application/fhir+json"


@dataclass
class AckLog:
    """What the device acknowledged: per resource reference the version and the time of its last write."""

    versions: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)
    last_ack: dict[str, float] = field(default_factory=dict)
    writes: int = 0
    requests: int = 0
    first_ack: float | None = None
    latest_ack: float | None = None

    def seen(self, refs: set[str]) -> int:
        """How many of these references were acknowledged at least once."""
        return sum(1 for ref in refs if ref in self.last_ack)

    def last_ack_of(self, refs: set[str]) -> float | None:
        """The time of the latest acknowledgement among these references (None if one is missing)."""
        times = [self.last_ack.get(ref) for ref in refs]
        return None if any(t is None for t in times) else max(t for t in times if t is not None)


def apply_write(log: AckLog, method: str, ref: str, body: bytes | None, now: float) -> tuple[int, int]:
    """Record one write of `ref` ("Type/id"); (HTTP status, version) as a FHIR server would answer."""
    version = log.versions.get(ref, 0) + 1
    created = version == 1
    log.versions[ref] = version
    if method == "DELETE":
        log.bodies.pop(ref, None)
    elif body is not None:
        log.bodies[ref] = body
    log.last_ack[ref] = now
    log.writes += 1
    log.first_ack = now if log.first_ack is None else log.first_ack
    log.latest_ack = now
    if method == "DELETE":
        return 204, version
    return (201 if created else 200), version


def _bundle_response(log: AckLog, bundle: dict[str, Any], now: float) -> dict[str, Any]:
    entries = []
    for entry in bundle.get("entry") or []:
        request = entry.get("request") or {}
        method = str(request.get("method", "POST")).upper()
        url = str(request.get("url", "")).split("?")[0].strip("/")
        if method == "POST" and "/" not in url:
            url = f"{url}/{uuid.uuid4()}"
        if method == "GET":  # a read in a batch: what was last written, or 404
            entries.append(_read_entry(log, url))
            continue
        resource = entry.get("resource")
        body = orjson.dumps(resource) if resource is not None else None
        status, version = apply_write(log, method, url, body, now)
        reason = {200: "OK", 201: "Created", 204: "No Content"}[status]
        entries.append(
            {
                "response": {
                    "status": f"{status} {reason}",
                    "location": f"{url}/_history/{version}",
                    "etag": f'W/"{version}"',
                }
            }
        )
    kind = "batch-response" if bundle.get("type") == "batch" else "transaction-response"
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def _read_entry(log: AckLog, ref: str) -> dict[str, Any]:
    body = log.bodies.get(ref)
    if body is None:
        return {"response": {"status": "404 Not Found"}}
    version = log.versions[ref]
    resource = orjson.loads(body)
    resource["meta"] = {**(resource.get("meta") or {}), "versionId": str(version)}
    return {"resource": resource, "response": {"status": "200 OK", "etag": f'W/"{version}"'}}


class InstantAckServer:
    """The device, served from its own thread and event loop on 127.0.0.1 (`base_url` ends in /fhir)."""

    def __init__(self, port: int = 0) -> None:
        self.log = AckLog()
        self.port = port or _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._serve, name="instant-ack", daemon=True)
        self._started = threading.Event()

    def start(self) -> InstantAckServer:
        self._thread.start()
        if not self._started.wait(15):
            raise RuntimeError("the instant-ack endpoint did not start")
        return self

    def reset(self) -> None:
        """Forget everything acknowledged so far (a new phase)."""
        self.log = AckLog()

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/fhir", self._base)
        app.router.add_route("*", "/fhir/{path:.*}", self._resource)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    async def _base(self, request: web.Request) -> web.Response:
        self.log.requests += 1
        if request.method != "POST":
            return _json(405, _outcome("only batch and transaction bundles are posted to the base"))
        bundle = orjson.loads(await request.read())
        return _json(200, _bundle_response(self.log, bundle, time.time()))

    async def _resource(self, request: web.Request) -> web.Response:
        self.log.requests += 1
        path = request.match_info["path"].strip("/")
        if request.method == "GET":
            return self._read(path)
        body = await request.read()
        if request.method == "POST" and "/" not in path:
            path = f"{path}/{uuid.uuid4()}"
        if request.method not in ("PUT", "POST", "DELETE") or path.count("/") != 1:
            return _json(405, _outcome(f"{request.method} {path} is not a write this device acknowledges"))
        status, version = apply_write(self.log, request.method, path, body or None, time.time())
        headers = {"ETag": f'W/"{version}"', "Location": f"{request.url.origin()}/fhir/{path}/_history/{version}"}
        if status == 204:
            return web.Response(status=204, headers=headers)
        return web.Response(status=status, body=body, content_type=_FHIR_JSON, headers=headers)

    def _read(self, path: str) -> web.Response:
        if path == "metadata":
            statement = {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "fhirVersion": "4.0.1",
                "kind": "instance",
            }
            return _json(200, statement)
        if path.endswith("_history") or "/" not in path:  # searches and histories: nothing to report
            return _json(200, {"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})
        body = self.log.bodies.get(path)
        if body is None:
            return _json(404, _outcome(f"{path} is not known"))
        resource = orjson.loads(body)
        version = self.log.versions[path]
        resource["meta"] = {**(resource.get("meta") or {}), "versionId": str(version)}
        return web.Response(
            status=200, body=orjson.dumps(resource), content_type=_FHIR_JSON, headers={"ETag": f'W/"{version}"'}
        )


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type=_FHIR_JSON)


def _outcome(text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "not-supported", "diagnostics": text}],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
