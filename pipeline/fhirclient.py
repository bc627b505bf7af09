"""The FHIR REST client: the one place that does HTTP. Classifies every answer into the error hierarchy."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson

from .config import TargetEndpoint
from .errors import (
    ReferenceNotReadyError,
    RejectedByTargetError,
    TargetAuthError,
    TargetUnavailableError,
    VersionConflictError,
)
from .ids import request_id

__all__ = ["FhirClient", "WriteOutcome", "classify_response"]

_FHIR_JSON = "application/fhir+json"
# HAPI: a referenced resource does not exist (HAPI-1094) or was deleted (HAPI-1096), both 400.
_MISSING_REFERENCE_MARKERS = ("HAPI-1094", "HAPI-1096", "not found, specified in path", "is deleted, specified in path")
_DIAGNOSTICS_LIMIT = 500
_NO_VERSION = "0"  # If-Match for "create only if absent": no stored version carries it (HAPI numbers from 1)


@dataclass(frozen=True)
class WriteOutcome:
    """What the target acknowledged."""

    status: int
    version_id: str | None


def _diagnostics(body: bytes) -> str:
    try:
        outcome = orjson.loads(body)
        issues = outcome.get("issue", []) if isinstance(outcome, dict) else []
        text = "; ".join(str(i.get("diagnostics", i.get("code", ""))) for i in issues if isinstance(i, dict))
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace")
    return text[:_DIAGNOSTICS_LIMIT]


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - asyncio.get_event_loop().time())
    except (TypeError, ValueError):
        return None


def classify_response(method: str, status: int, body: bytes, retry_after: str | None = None) -> None:
    """Raise the error a non-success answer means; return for success."""
    if 200 <= status < 300 or (method == "DELETE" and status in (404, 410)):
        return
    detail = _diagnostics(body)
    if status in (408, 429) or status >= 500:
        raise TargetUnavailableError(f"target answered {status}: {detail}", retry_after=_retry_after(retry_after))
    if status == 412 or (status == 409 and "HAPI-0989" in detail):  # If-Match named a superseded version
        raise VersionConflictError(f"target resource changed since our last write ({status}): {detail}")
    if method == "DELETE" and status == 409:
        raise ReferenceNotReadyError(f"target refuses the delete while other resources reference it: {detail}")
    if status in (400, 404, 409, 412, 422) and any(marker in detail for marker in _MISSING_REFERENCE_MARKERS):
        raise ReferenceNotReadyError(f"target lacks a referenced resource ({status}): {detail}")
    if status in (401, 403):
        raise TargetAuthError(f"target refused our credentials ({status}): {detail}", status=status)
    raise RejectedByTargetError(f"target rejected the {method} ({status}): {detail}", status=status)


def _put_entry(ref: str, body: bytes, version: str | None) -> bytes:
    """One PUT entry of a transaction bundle, the resource's bytes spliced in as they are (not re-encoded)."""
    request: dict[str, str] = {"method": "PUT", "url": ref}
    if version is not None:
        request["ifMatch"] = f'W/"{version}"'
    return b"".join([b'{"resource":', body, b',"request":', orjson.dumps(request), b"}"])


def _entry_status(answer: dict[str, Any]) -> int:
    """The HTTP status of one entry of a batch or transaction response ("201 Created" -> 201; 0 if none)."""
    return int(str((answer.get("response") or {}).get("status", "0")).split(" ", 1)[0] or 0)


class FhirClient:
    """A FHIR R4 endpoint written with PUT (update-as-create) and DELETE, over one pooled session."""

    def __init__(self, endpoint: TargetEndpoint, *, connections: int = 16) -> None:
        self.base_url = endpoint.fhir_base_url.rstrip("/")
        headers = {"Accept": _FHIR_JSON, "User-Agent": "cdrsync"}
        if endpoint.auth_token is not None:
            headers["Authorization"] = f"Bearer {endpoint.auth_token.get_secret_value()}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=endpoint.timeout_seconds)
        self._guarded_create = endpoint.first_write == "guarded"
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FhirClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._connections),
            )
        return self._session

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()

    async def _send(
        self, method: str, path: str, body: bytes | None = None, *, if_match: str | None = None
    ) -> WriteOutcome:
        headers = {"X-Request-ID": request_id()}
        if body is not None:
            headers["Content-Type"] = _FHIR_JSON
        if if_match is not None:
            headers["If-Match"] = f'W/"{if_match}"'  # FHIR R4 3.1.0.5.4: version-aware updates
        try:
            url = f"{self.base_url}/{path}" if path else self.base_url
            async with self._session_or_new().request(method, url, data=body, headers=headers) as response:
                payload = await response.read()
                classify_response(method, response.status, payload, response.headers.get("Retry-After"))
                etag = response.headers.get("ETag", "")
                version = etag.removeprefix("W/").strip('"') or None
                return WriteOutcome(response.status, version)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TargetUnavailableError(f"{method} {path}: {type(exc).__name__}: {exc}") from None

    async def put(
        self, resource_type: str, resource_id: str, body: bytes, *, if_match: str | None = None
    ) -> WriteOutcome:
        """Create or replace a resource at a client-assigned id; with if_match, only over that version."""
        return await self._send("PUT", f"{resource_type}/{resource_id}", body, if_match=if_match)

    async def create_if_absent(self, resource_type: str, resource_id: str, body: bytes) -> WriteOutcome | None:
        """Create a resource at a client-assigned id only if the target holds none there, in one request;
        None when it was not written: the target holds something there (deleted included), it will not
        create under the condition, or this target is to be read first (TargetEndpoint.first_write "read").

        The request is a PUT with If-Match naming version "0", which no stored version carries: HAPI creates
        an absent resource and refuses an existing one (409). A server numbering versions from 0 must be
        configured "read"."""
        if not self._guarded_create:
            return None
        try:
            return await self.put(resource_type, resource_id, body, if_match=_NO_VERSION)
        except (VersionConflictError, RejectedByTargetError):
            return None

    @property
    def create_only_version(self) -> str | None:
        """The If-Match version under which this target creates a resource only if it holds none there (a
        transaction entry's, as create_if_absent's PUT); None when the resource must be read first."""
        return _NO_VERSION if self._guarded_create else None

    async def delete(self, resource_type: str, resource_id: str) -> WriteOutcome:
        """Delete a resource; an already absent one counts as deleted."""
        return await self._send("DELETE", f"{resource_type}/{resource_id}")

    async def transaction_put(self, entries: list[tuple[str, bytes, str | None]]) -> list[WriteOutcome]:
        """PUT several resources in one transaction: (reference, body, If-Match version or None) each.

        All or nothing (FHIR R4 3.1.0.11.2): a failure raises what the answer means and nothing was
        written. On success, each entry's outcome, in the order given.
        """
        entry_bytes = [_put_entry(ref, body, version) for ref, body, version in entries]
        answers = await self._post_bundle("transaction", entry_bytes, f"transaction of {len(entries)}")
        outcomes = []
        for answer in answers:
            etag = str((answer.get("response") or {}).get("etag", ""))
            outcomes.append(WriteOutcome(_entry_status(answer), etag.removeprefix("W/").strip('"') or None))
        return outcomes

    async def read_many(self, references: list[str]) -> dict[str, dict[str, Any] | None]:
        """Read several resources in one batch: reference -> the resource, None where the target has none, an
        empty dict where it was deleted (410 Gone). A read the target refuses raises what its answer means."""
        entry_bytes = [orjson.dumps({"request": {"method": "GET", "url": ref}}) for ref in references]
        answers = await self._post_bundle("batch", entry_bytes, f"batch of {len(references)} reads")
        found: dict[str, dict[str, Any] | None] = {}
        for ref, answer in zip(references, answers, strict=True):
            status = _entry_status(answer)
            if status in (404, 410):
                found[ref] = None if status == 404 else {}
                continue
            classify_response("GET", status, orjson.dumps((answer.get("response") or {}).get("outcome") or {}))
            found[ref] = answer.get("resource")
        return found

    async def _post_bundle(self, kind: str, entries: list[bytes], what: str) -> list[dict[str, Any]]:
        """POST a batch or transaction bundle of encoded entries; the answer's entries, one per entry sent."""
        bundle = b"".join(
            [b'{"resourceType":"Bundle","type":"', kind.encode(), b'","entry":[', b",".join(entries), b"]}"]
        )
        headers = {"Content-Type": _FHIR_JSON, "X-Request-ID": request_id()}
        try:
            async with self._session_or_new().post(self.base_url, data=bundle, headers=headers) as response:
                payload = await response.read()
                classify_response("POST", response.status, payload, response.headers.get("Retry-After"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TargetUnavailableError(f"POST {what}: {type(exc).__name__}: {exc}") from None
        answers: list[dict[str, Any]] = orjson.loads(payload).get("entry", [])
        if len(answers) != len(entries):
            raise RejectedByTargetError(f"{kind} answered {len(answers)} entries for {len(entries)}", status=200)
        return answers

    async def delete_all(self, references: list[str]) -> WriteOutcome:
        """Delete several resources in one transaction (the target checks references at its end)."""
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"request": {"method": "DELETE", "url": ref}} for ref in references],
        }
        return await self._send("POST", "", orjson.dumps(bundle))

    async def request_ids_kept(self) -> bool | None:
        """Whether the server gets cdrsync's X-Request-ID (HAPI answers with the id it used: ours, or one it
        made when none arrived, e.g. behind a proxy that drops it); None for a server that does not say."""
        sent = request_id()
        try:
            async with self._session_or_new().get(
                f"{self.base_url}/metadata?_elements=fhirVersion", headers={"X-Request-ID": sent}
            ) as response:
                await response.read()
                classify_response("GET", response.status, b"")
                used = response.headers.get("X-Request-ID")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TargetUnavailableError(f"GET metadata: {type(exc).__name__}: {exc}") from None
        return None if used is None else used == sent

    async def probe(self) -> int:
        """HTTP status of the capability statement (GET metadata); 0 when the target cannot be reached.

        Only its FHIR version is asked for: HAPI's full statement is 1.5 MB, too much for a probe
        (a server that ignores _elements sends it whole, which works too).
        """
        try:
            async with self._session_or_new().get(f"{self.base_url}/metadata?_elements=fhirVersion") as response:
                await response.read()
                return response.status
        except (TimeoutError, aiohttp.ClientError):
            return 0

    async def get_json(self, path_or_url: str) -> dict[str, Any]:
        """GET a bundle or resource (a path under the base, or a full paging link the server gave)."""
        url = path_or_url if path_or_url.startswith(("http://", "https://")) else f"{self.base_url}/{path_or_url}"
        try:
            async with self._session_or_new().get(url) as response:
                payload = await response.read()
                classify_response("GET", response.status, payload)
                result: dict[str, Any] = orjson.loads(payload)
                return result
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TargetUnavailableError(f"GET {path_or_url.split('?')[0]}: {exc}") from None

    async def meta_add(self, resource_type: str, resource_id: str, tags: list[dict[str, str]]) -> None:
        """Add tags to a resource's meta without a new version (the FHIR $meta-add operation)."""
        parameters = {"resourceType": "Parameters", "parameter": [{"name": "meta", "valueMeta": {"tag": tags}}]}
        await self._send("POST", f"{resource_type}/{resource_id}/$meta-add", orjson.dumps(parameters))

    async def last_stored(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """The latest version holding content, also of a deleted resource (from its _history); None if the
        target never held one."""
        try:
            bundle = await self.get_json(f"{resource_type}/{resource_id}/_history?_count=10")
        except RejectedByTargetError as error:
            if error.status in (404, 410):
                return None
            raise
        for entry in bundle.get("entry") or []:
            if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                found: dict[str, Any] = entry["resource"]
                return found
        return None

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """Read a resource, None if the target does not have it (or it was deleted)."""
        return (await self.read_or_gone(resource_type, resource_id))[0]

    async def read_or_gone(self, resource_type: str, resource_id: str) -> tuple[dict[str, Any] | None, bool]:
        """Read a resource: (it, or None if the target does not have it; whether it says it was deleted, 410)."""
        try:
            async with self._session_or_new().get(f"{self.base_url}/{resource_type}/{resource_id}") as response:
                payload = await response.read()
                if response.status in (404, 410):
                    return None, response.status == 410
                classify_response("GET", response.status, payload)
                result: dict[str, Any] = orjson.loads(payload)
                return result, False
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TargetUnavailableError(f"GET {resource_type}/{resource_id}: {exc}") from None
