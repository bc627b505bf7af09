"""R1 (pipeline drain vs a raw consume loop) and R2 (pipeline into the real server vs the naive loop).

Both measure from the moment a process starts on records already on the source topic until the target
acknowledged the last expected resource: pipeline time includes its start-up, as a restarted worker's does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import TargetUnavailableError

from . import hapi
from .context import Bench, Phase
from .dataset import Dataset, expected_ref
from .floors import run_faust_relay_floor, validation_alone
from .instant_ack import InstantAckServer
from .machine import cpu_use, read_cpu
from .naive import NaiveRun, start_naive_loop
from .offsets import Offsets, read_range, records_on
from .profile import Profiler
from .worker import BenchWorker

__all__ = ["Throughput", "raw_drain", "run_r1", "run_r2"]


@dataclass
class Throughput:
    """Resources (or records) per second over a measured span."""

    count: int
    seconds: float
    details: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.rate, 2),
            **self.details,
        }


def raw_drain(bootstrap: str, topic: str, start: Offsets, end: Offsets, group: str) -> Throughput:
    """A bare confluent_kafka Consumer.consume(500) loop from `start` to `end`: nothing decoded, nothing written."""
    began = time.time()
    count, first = 0, 0.0
    # A short timeout: consume() waits for 500 records or the timeout, and the range's last batch is smaller.
    with read_range(bootstrap, topic, start, end, group, timeout=0.05) as records:
        for _ in records:
            count += 1
            first = first or time.time()
        done = time.time()
    steady = round(count / (done - first), 1) if done > first else None
    details = {"measured": "Consumer creation to the last record of the range", "steady_per_second": steady}
    return Throughput(count, done - began, details)


def run_r1(bench: Bench, data: Dataset, device: InstantAckServer, profile: bool = True) -> dict[str, Any]:
    """R1: the same records drained by the raw loop, then by a worker whose target acknowledges at once."""
    phase = bench.phase("r1")
    resources = data.resources(bench.namespace("r1"))
    before, after, capture = bench.load(resources)
    bench.log(f"R1: {len(resources)} resources on {bench.source_topic} (Debezium: {capture:.1f} s)")
    raw = raw_drain(bench.settings.kafka_bootstrap, bench.source_topic, before, after, f"{phase.app_id}-raw")
    bench.log(f"R1: raw consume(500) loop: {raw.count} records in {raw.seconds:.2f} s = {raw.rate:.0f}/s")
    validation = validation_alone(bench, bench.site, before, after, raw.rate)
    expected = {expected_ref(r, bench.site.site) for r in resources}
    device.reset()
    worker = bench.worker(phase, device.base_url, start=before).start()
    profiler = None
    try:
        ready = worker.wait_ready()
        cpu_before = read_cpu(worker.pid)
        if profile:  # from readiness on: the process is the worker by then (pipeline.cli execs it)
            profiler = Profiler(worker.pid, bench.home / "profiles" / f"{phase.app_id}.txt").start()
        bench.wait_drained(phase, lambda: device.log.seen(expected) == len(expected), timeout=3600)
        last = device.log.last_ack_of(expected)
        assert last is not None
        cpu = cpu_use(cpu_before, read_cpu(worker.pid))
        stages = _stage_load(bench, worker)
    finally:
        cpu_profile = profiler.stop() if profiler else None
        worker.stop()
    written = _records_written(bench, phase)
    pipeline = Throughput(
        len(expected),
        last - worker.started_at,
        {
            "measured": "worker spawn to the last expected resource acknowledged",
            "worker_ready_seconds": round(ready, 2),
            "steady_per_second": round(len(expected) / max(1e-9, last - (device.log.first_ack or last)), 2),
            "writes_acknowledged": device.log.writes,
            "dead_letters": phase.dead_letters(bench.settings.kafka_bootstrap),
            "drain_seconds": round(last - (worker.started_at + ready), 2),
            "stages": stages,
            "cpu": cpu,
            "records_written": written,
        },
    )
    bench.log(f"R1: pipeline: {pipeline.count} resources in {pipeline.seconds:.1f} s = {pipeline.rate:.1f}/s")
    faust_alone = run_faust_relay_floor(bench, before, after, raw.rate)  # after the goal's figure: it cannot cost it
    return {
        "resources": len(resources),
        "raw": raw.as_dict(),
        "pipeline": pipeline.as_dict(),
        "ratio": round(pipeline.rate / raw.rate, 4) if raw.rate else None,
        "validation_alone": validation,
        "faust_alone": faust_alone,
        "profile": cpu_profile,
    }


def _records_written(bench: Bench, phase: Phase) -> dict[str, int] | None:
    """Records on each of the phase's topics and changelogs, named without the phase's namespace
    (`fhir.ready.v1`, `<table>-changelog`), counted once the worker stopped; None if Kafka did not answer."""
    prefixes = (phase.prefix, f"{phase.app_id}-")
    try:
        written = records_on(bench.settings.kafka_bootstrap, prefixes)
    except Exception as error:  # a figure beside the goal: its loss must not cost R1's
        bench.log(f"R1: the records written could not be counted ({error})")
        return None
    return {next(t[len(p) :] for p in prefixes if t.startswith(p)): count for t, count in written.items()}


def _stage_load(bench: Bench, worker: BenchWorker) -> dict[str, dict[str, float]] | None:
    """Each stage's records, batches and busy time in the worker so far; None if its /metrics did not answer."""
    try:
        return worker.stage_load()
    except TargetUnavailableError as error:
        bench.log(f"R1: the worker's /metrics could not be read ({error}); no load by stage")
        return None


def run_r2(bench: Bench, data: Dataset) -> dict[str, Any]:
    """R2: the pipeline into the real server, then the naive loop into the same server, each on its own ids."""
    site = bench.site.site
    phase = bench.phase("r2p")
    resources = data.resources(bench.namespace("r2p"))
    before, _after, _capture = bench.load(resources)
    expected = {expected_ref(r, site) for r in resources}
    worker = bench.worker(phase, bench.hapi_url, start=before).start()
    try:
        ready = worker.wait_ready()
        stored: dict[str, float] = {}
        bench.wait_drained(phase, lambda: _all_stored(bench.hapi_url, expected, stored), timeout=3600, poll=2.0)
    finally:
        worker.stop()
    pipeline = Throughput(
        len(expected),
        max(stored.values()) - worker.started_at,
        {
            "measured": "worker spawn to the last expected resource stored (server's meta.lastUpdated)",
            "worker_ready_seconds": round(ready, 2),
            "dead_letters": phase.dead_letters(bench.settings.kafka_bootstrap),
        },
    )
    bench.log(f"R2: pipeline: {pipeline.count} resources in {pipeline.seconds:.1f} s = {pipeline.rate:.1f}/s")
    naive = run_naive(bench, data, "r2n")
    bench.log(f"R2: naive loop: {naive.count} resources in {naive.seconds:.1f} s = {naive.rate:.1f}/s")
    return {
        "resources": len(resources),
        "pipeline": pipeline.as_dict(),
        "naive": naive.as_dict(),
        "ratio": round(pipeline.rate / naive.rate, 4) if naive.rate else None,
    }


def run_naive(bench: Bench, data: Dataset, name: str) -> Throughput:
    resources = data.resources(bench.namespace(name))
    before, after, _capture = bench.load(resources)
    expected = {expected_ref(r, bench.site.site) for r in resources}
    run = NaiveRun(
        str(bench.root),
        bench.site.site,
        bench.settings.kafka_bootstrap,
        bench.source_topic,
        before,
        bench.hapi_url,
        f"bench-{bench.run_id}-{name}",
        until=after,  # known already: the loop need not wait for finish() to say it (two full runs hung there)
    )
    loop = start_naive_loop(run)
    result = loop.finish(after, timeout=3600)
    stored: dict[str, float] = {}
    if not _all_stored(bench.hapi_url, expected, stored):
        missing = len(expected) - len(stored)
        raise RuntimeError(f"naive loop: {missing} resources missing at the server; failures: {result.failures[:5]}")
    return Throughput(
        len(expected),
        max(stored.values()) - loop.started_at,
        {
            "measured": "process spawn to the last expected resource stored (server's meta.lastUpdated)",
            "records_polled": result.records,
            "writes": result.writes,
            "failed_writes": result.failed,
            "held_for_references_max": result.deferred_max,
        },
    )


def _all_stored(base: str, expected: set[str], stored: dict[str, float]) -> bool:
    """Whether the server holds every expected resource; fills `stored` (ref -> lastUpdated)."""
    missing = expected - stored.keys()
    if missing:
        stored.update(hapi.last_updated(base, missing))
    elif stored:  # all there once: read again, a later version (a pending reference resolved) moves the time
        stored.update(hapi.last_updated(base, expected))
    return expected <= stored.keys()
