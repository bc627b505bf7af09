"""The naive loop R2 and R3 compare the pipeline with: poll one record, map it, one PUT, commit.

It maps with the project's own functions (normalize_change, then identity.resolve_identity with dicts for
tables, which gives the same target ids, references and body as the pipeline), writes with one blocking
HTTP request per resource over a kept-alive connection, and commits each record synchronously before
polling the next. It does only what it must to be correct against a server that enforces referential
integrity: a resource whose references are not written yet waits in memory until they are (the records of
one patient are spread over the source topic's partitions). No Provenance, no audit, no crash safety.
It runs in a process of its own, like the worker.
"""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import queue
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.config import load_config
from pipeline.identity import IdentityState, resolve_identity
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.records import NormalizedResource, RoutedResource

__all__ = ["NaiveResult", "NaiveRun", "start_naive_loop"]

Offsets = dict[int, int]


@dataclass
class NaiveResult:
    records: int = 0
    writes: int = 0
    failed: int = 0
    deferred_max: int = 0
    started_at: float = 0.0
    last_ack: float = 0.0
    failures: list[str] = field(default_factory=list)


class _Target:
    """One kept-alive HTTP connection to the FHIR base URL."""

    def __init__(self, base_url: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.path = parts.hostname or "localhost", parts.port or 80, parts.path.rstrip("/")
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def send(self, method: str, ref: str, body: bytes | None) -> int:
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        for attempt in (1, 2):
            try:
                self.conn.request(method, f"{self.path}/{ref}", body=body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                return response.status
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class _Writer:
    """PUTs routed resources, holding back those whose references are not written yet."""

    def __init__(self, target: _Target, result: NaiveResult) -> None:
        self.target, self.result = target, result
        self.written: set[str] = set()
        self.waiting: dict[str, list[RoutedResource]] = defaultdict(list)
        self.deferred = 0

    def offer(self, record: RoutedResource) -> None:
        missing = next((d for d in record.dependencies if d not in self.written), None)
        if missing is not None and not record.is_delete:
            self.waiting[missing].append(record)
            self.deferred += 1
            self.result.deferred_max = max(self.result.deferred_max, self.deferred)
            return
        self._write(record)

    def _failed(self, record: RoutedResource, why: str) -> None:
        """Count a write that failed, and every record waiting for it, which can now never be written: the
        loop would otherwise wait for them to the end of its timeout."""
        self.result.failed += 1
        if len(self.result.failures) < 20:
            self.result.failures.append(why)
        for dependent in self.waiting.pop(record.target_ref, []):
            self.deferred -= 1
            self._failed(dependent, f"{dependent.resource_type} not written: {record.target_ref} failed")

    def _write(self, record: RoutedResource) -> None:
        method = "DELETE" if record.is_delete else "PUT"
        body = record.resource.encode() if record.resource is not None else None
        status = self.target.send(method, record.target_ref, body)
        if status >= 300 and not (method == "DELETE" and status in (404, 410)):
            self._failed(record, f"{method} {record.resource_type} answered {status}")
            return
        self.result.writes += 1
        self.result.last_ack = time.time()
        self.written.add(record.target_ref)
        for released in self.waiting.pop(record.target_ref, []):
            self.deferred -= 1
            self.offer(released)


@dataclass(frozen=True)
class NaiveRun:
    """What one loop reads and where it writes."""

    config_root: str
    site: str
    bootstrap: str
    topic: str
    start: Offsets
    base_url: str
    group: str
    until: Offsets | None = None  # where the source ends, when known at the start (else sent by finish())


def _loop(run: NaiveRun, control: multiprocessing.Queue[Any], results: multiprocessing.Queue[Any]) -> None:
    result = NaiveResult(started_at=time.time())
    site = load_config(Path(run.config_root)).sites[run.site]
    consumer = Consumer(
        {"bootstrap.servers": run.bootstrap, "group.id": run.group, "enable.auto.commit": False, "log_level": 3}
    )
    consumer.assign([TopicPartition(run.topic, p, o) for p, o in run.start.items()])
    state = IdentityState({}, {})
    writer = _Writer(_Target(run.base_url), result)
    position = dict(run.start)
    until: Offsets | None = run.until
    while True:
        if until is None:
            with contextlib.suppress(queue.Empty):
                until = control.get_nowait()
        if until is not None and all(position.get(p, 0) >= o for p, o in until.items()) and writer.deferred == 0:
            break
        message = consumer.poll(0.5)
        if message is None or message.error() is not None:
            continue
        result.records += 1
        partition, offset = message.partition() or 0, message.offset() or 0
        position[partition] = offset + 1
        where = SourcePosition(run.topic, partition, offset)
        record = normalize_change(site, message.value(), where)
        if isinstance(record, NormalizedResource):
            for routed in resolve_identity(state, record, site).routed:
                writer.offer(routed)
        consumer.commit(message=message, asynchronous=False)
    consumer.close()
    results.put(result)


class NaiveProcess:
    """The loop in a spawned process; `finish(until)` tells it where the source ends and waits for its result."""

    def __init__(self, run: NaiveRun) -> None:
        context = multiprocessing.get_context("spawn")
        self.control: multiprocessing.Queue[Any] = context.Queue()
        self.results: multiprocessing.Queue[Any] = context.Queue()
        self.process = context.Process(target=_loop, args=(run, self.control, self.results), name="naive-loop")
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def start(self) -> NaiveProcess:
        self.started_at = time.time()
        self.process.start()
        return self

    def finish(self, until: Offsets, timeout: float) -> NaiveResult:
        self.control.put(until)
        try:
            result: NaiveResult = self.results.get(timeout=timeout)
        except queue.Empty:
            self.process.kill()
            raise TimeoutError(f"the naive loop did not drain its records in {timeout:.0f}s") from None
        self.process.join(30)
        return result


def start_naive_loop(run: NaiveRun) -> NaiveProcess:
    return NaiveProcess(run).start()
