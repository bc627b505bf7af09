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

import http.client
import multiprocessing
import time
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import cast

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


_HEARTBEAT_SECONDS = 5.0


def _loop(run: NaiveRun, control: Connection, results: Connection) -> None:
    """The loop; reports progress on `results` every few seconds, then ("done", result) or ("error", why)."""
    try:
        results.send(("done", _drain(run, control, results)))
    except BaseException as error:  # the harness must hear of it at once, not at the end of its timeout
        results.send(("error", f"{type(error).__name__}: {error}"))
        raise


def _drain(run: NaiveRun, control: Connection, results: Connection) -> NaiveResult:
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
    reported = time.monotonic()
    while True:
        if until is None and control.poll():
            until = control.recv()
        if until is not None and all(position.get(p, 0) >= o for p, o in until.items()) and writer.deferred == 0:
            break
        if time.monotonic() - reported >= _HEARTBEAT_SECONDS:
            reported = time.monotonic()
            results.send(("progress", _progress(result, writer, position, until)))
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
    return result


def _progress(result: NaiveResult, writer: _Writer, position: Offsets, until: Offsets | None) -> str:
    """What the loop has done so far, for the harness's stall check and its error message."""
    behind = "not known yet" if until is None else sum(max(0, o - position.get(p, 0)) for p, o in until.items())
    return (
        f"{result.records} records polled, {result.writes} written, {result.failed} failed, "
        f"{writer.deferred} held for references, records still to poll: {behind}"
    )


class NaiveProcess:
    """The loop in a spawned process; `finish(until)` tells it where the source ends and waits for its result.

    The hand-over uses pipes, written in the sending thread (a multiprocessing queue writes from a feeder
    thread: two full runs hung with the loop never having received `until`). The loop reports progress
    every few seconds: finish() gives up as soon as the loop exited without a result, or made no progress
    for `stall` seconds, saying how far it got, instead of waiting out its whole timeout.
    """

    def __init__(self, run: NaiveRun) -> None:
        context = multiprocessing.get_context("spawn")
        control, self.control = context.Pipe(duplex=False)  # (reader, writer): the loop reads
        self.results, results = context.Pipe(duplex=False)  # the harness reads
        self.process = context.Process(target=_loop, args=(run, control, results), name="naive-loop")
        self._ends = (control, results)
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def start(self) -> NaiveProcess:
        self.started_at = time.time()
        self.process.start()
        for end in self._ends:  # the child's ends: closed here, so a dead child reads as EOF
            end.close()
        return self

    def finish(self, until: Offsets, timeout: float, stall: float = 300.0) -> NaiveResult:
        self.control.send(until)
        deadline = time.monotonic() + timeout
        progress, moved = "nothing reported", time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if now > deadline or now - moved > stall:
                    why = "in its timeout" if now > deadline else f"and made no progress for {stall:.0f}s"
                    raise TimeoutError(f"the naive loop did not drain its records {why}; {progress}")
                try:
                    if not self.results.poll(min(5.0, max(0.1, deadline - now))):
                        continue
                    kind, payload = self.results.recv()
                except EOFError:
                    self.process.join(5)
                    raise RuntimeError(
                        f"the naive loop exited (code {self.process.exitcode}) without a result; {progress}"
                    ) from None
                if kind == "done":
                    self.process.join(30)
                    return cast(NaiveResult, payload)
                if kind == "error":
                    raise RuntimeError(f"the naive loop failed: {payload}; {progress}")
                if payload != progress:
                    progress, moved = payload, time.monotonic()
        finally:
            self.process.join(1)  # done already, unless it failed or stalled
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)


def start_naive_loop(run: NaiveRun) -> NaiveProcess:
    return NaiveProcess(run).start()
