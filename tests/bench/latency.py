"""R3: source-commit -> target latency at steady change rates, for the pipeline and for the naive loop.

A generator changes rows of the bench table at a fixed rate: it updates a pool of Observations (and every
tenth change inserts a new one), each change setting valueQuantity.value to its own sequence number, and
notes the time its transaction committed. Afterwards each resource's `_history` at the server says when a
version holding that number, or a later one, was stored (meta.lastUpdated): observed the same way for both,
and a change that a writer folds into a later version counts as delivered with that version.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from pipeline.errors import TargetUnavailableError
from tests.casebuilder import observation_for, patient

from . import hapi, offsets
from .context import Bench
from .dataset import expected_ref
from .floors import capture_latencies
from .naive import NaiveRun, start_naive_loop
from .report import summarize
from .worker import BenchWorker, StageBuckets, stage_times

__all__ = ["Change", "latencies", "run_r3"]

POOL_PATIENTS, POOL_OBSERVATIONS, INSERT_EVERY = 10, 10, 10
_UPSERT = (
    "INSERT INTO fhir.resource (resource_type, id, version, content) VALUES (%s, %s, 1, %s) "
    "ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
    "version = fhir.resource.version + 1, updated_at = now()"
)


@dataclass(frozen=True)
class Change:
    """One committed source change: the target reference it becomes, the value it set, its commit time."""

    ref: str
    value: float
    committed_at: float


def latencies(changes: Sequence[Change], versions: dict[str, list[tuple[float, float]]]) -> tuple[list[float], int]:
    """Seconds from each change's commit to the first stored version of its resource holding its value or a
    later one; `versions` maps a reference to (value, lastUpdated) of its versions. Also: changes never seen."""
    out, unseen = [], 0
    for change in changes:
        stored = [at for value, at in versions.get(change.ref, []) if value >= change.value]
        if stored:
            out.append(min(stored) - change.committed_at)
        else:
            unseen += 1
    return out, unseen


def _pool(namespace: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    patients = [patient(namespace, n) for n in range(POOL_PATIENTS)]
    observations = [
        observation_for(f"{namespace}-{p}", person["id"], k, 0.0)
        for p, person in enumerate(patients)
        for k in range(POOL_OBSERVATIONS)
    ]
    return patients, observations


def _generate(bench: Bench, observations: list[dict[str, Any]], rate: float, seconds: float) -> list[Change]:
    """Change rows at `rate` per second for `seconds`; each change's reference, value and commit time."""
    site, count = bench.site.site, int(rate * seconds)
    changes = []
    with psycopg.connect(bench.dsn, autocommit=True) as conn:
        started = time.monotonic()
        for n in range(1, count + 1):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            base = observations[n % len(observations)]
            if n % INSERT_EVERY == 0:
                base = {**base, "id": f"{base['id']}-n{n}"}
            resource = {**base, "valueQuantity": {**base["valueQuantity"], "value": float(n)}}
            conn.execute(_UPSERT, ("Observation", resource["id"], orjson.dumps(resource).decode()))
            changes.append(Change(expected_ref(resource, site), float(n), time.time()))
        achieved = count / (time.monotonic() - started)
    bench.log(f"R3: {count} changes at {rate}/s (achieved {achieved:.1f}/s)")
    return changes


def _observe(bench: Bench, changes: list[Change], timeout: float) -> dict[str, list[tuple[float, float]]]:
    """Wait until every change is at the server, then read each resource's history."""
    latest: dict[str, float] = {}
    for change in changes:
        latest[change.ref] = max(latest.get(change.ref, 0.0), change.value)
    deadline = time.monotonic() + timeout
    pending = set(latest)
    while pending and time.monotonic() < deadline:
        for ref, resource in hapi.current(bench.hapi_url, pending).items():
            if _value(resource) >= latest[ref]:
                pending.discard(ref)
        if pending:
            time.sleep(2)
    if pending:
        bench.log(f"R3: {len(pending)} resources did not reach their last value in {timeout:.0f}s")
    versions = {}
    for ref in latest:
        versions[ref] = [
            (_value(v), hapi.parse_instant(v["meta"]["lastUpdated"])) for v in hapi.history(bench.hapi_url, ref)
        ]
    return versions


def _value(resource: dict[str, Any]) -> float:
    return float((resource.get("valueQuantity") or {}).get("value", -1.0))


def _warm_up(bench: Bench, namespace: str) -> list[dict[str, Any]]:
    """The pool's patients and observations written once and stored at the server before the clock starts."""
    patients, observations = _pool(namespace)
    bench.load(patients + observations)
    expected = {expected_ref(r, bench.site.site) for r in patients + observations}
    deadline = time.monotonic() + 600
    while len(hapi.last_updated(bench.hapi_url, expected)) < len(expected):
        if time.monotonic() > deadline:
            raise TimeoutError(f"R3 warm-up: the pool of {namespace} did not reach the server in 600 s")
        time.sleep(1)
    return observations


def _measure(
    bench: Bench, namespace: str, rate: float, seconds: float, worker: BenchWorker | None = None
) -> dict[str, Any]:
    """One rate: latencies of its changes; with a worker, also where they spent their time in it, by stage."""
    observations = _warm_up(bench, namespace)
    before = _stage_reading(bench, worker)
    bootstrap = bench.settings.kafka_bootstrap
    source_start = offsets.end_offsets(bootstrap, bench.source_topic)
    changes = _generate(bench, observations, rate, seconds)
    versions = _observe(bench, changes, timeout=max(300.0, 3 * seconds))
    after = _stage_reading(bench, worker)
    values, unseen = latencies(changes, versions)
    result = {**summarize(values), "unseen": unseen, "rate": rate, "seconds": seconds}
    source_end = offsets.end_offsets(bootstrap, bench.source_topic)
    group = f"bench-{bench.run_id}-capture"
    with offsets.read_range(bootstrap, bench.source_topic, source_start, source_end, group, 1.0) as records:
        captured, missed = capture_latencies(changes, records)
    result["capture"] = {**summarize(captured), "unseen": missed}
    if before is not None and after is not None:
        result["stages"] = stage_times(before, after)
    return result


def _stage_reading(bench: Bench, worker: BenchWorker | None) -> StageBuckets | None:
    """The worker's cdrsync_stage_seconds now; None without a worker, or if its /metrics did not answer."""
    if worker is None:
        return None
    try:
        return worker.stage_buckets()
    except TargetUnavailableError as error:
        bench.log(f"R3: the worker's /metrics could not be read ({error}); no times by stage")
        return None


def run_r3(bench: Bench, rates: list[float], seconds: float) -> dict[str, Any]:
    """Each rate for the pipeline (one worker writing to the real server), then for the naive loop."""
    results: dict[str, Any] = {_key(rate): {} for rate in rates}
    phase = bench.phase("r3p")
    worker = bench.worker(phase, bench.hapi_url).start()
    try:
        worker.wait_ready()
        for rate in rates:
            results[_key(rate)]["pipeline"] = summary = _measure(
                bench, bench.namespace(f"p{_key(rate)}"), rate, seconds, worker
            )
            bench.log(f"R3: pipeline at {rate}/s: p50 {summary.get('p50')} s, p99 {summary.get('p99')} s")
    finally:
        worker.stop()
    for rate in rates:
        start = offsets.end_offsets(bench.settings.kafka_bootstrap, bench.source_topic)
        name = f"n{_key(rate)}"
        run = NaiveRun(
            str(bench.root),
            bench.site.site,
            bench.settings.kafka_bootstrap,
            bench.source_topic,
            start,
            bench.hapi_url,
            f"bench-{bench.run_id}-r3{name}",
        )
        loop = start_naive_loop(run)
        try:
            results[_key(rate)]["naive"] = summary = _measure(bench, bench.namespace(name), rate, seconds)
        finally:
            loop.finish(offsets.end_offsets(bench.settings.kafka_bootstrap, bench.source_topic), timeout=600)
        bench.log(f"R3: naive loop at {rate}/s: p50 {summary.get('p50')} s, p99 {summary.get('p99')} s")
    return results


def _key(rate: float) -> str:
    return f"{rate:g}"
