"""Worker memory with many patients in its identity and ordering state.

Synthetic patients (a minimal Patient with its shared identifier, as tests/casebuilder.py builds them,
not Synthea: generating 100 000 Synthea patients would take hours) go through the bench database and
Debezium like every other change; each one leaves an entry in the identity tables (local patient ->
global key) and the ordering tables (released references, the patient's sources). The worker writes to
the instant-ack device, so the target costs nothing. RSS is read from /proc after each step has drained
and the worker has been idle for a few seconds (median of five readings).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from pipeline.errors import TargetUnavailableError
from tests.casebuilder import patient

from .context import Bench
from .dataset import expected_ref
from .instant_ack import InstantAckServer
from .worker import BenchWorker

__all__ = ["memory_result", "run_memory"]

_MIB = 1024 * 1024


def _rss_mib(bench: Bench, read: Any, settle: float = 5.0) -> float:
    time.sleep(settle)
    readings = []
    for _ in range(5):
        readings.append(read())
        time.sleep(1)
    return round(statistics.median(readings) / _MIB, 1)


def _parts_mib(bench: Bench, worker: BenchWorker) -> dict[str, float]:
    """Where the worker says its memory is (agents/store.py worker_memory), in MiB; empty if it cannot say."""
    try:
        return {part: round(value / _MIB, 1) for part, value in sorted(worker.memory_parts().items())}
    except TargetUnavailableError as error:
        bench.log(f"memory: the worker's /metrics could not be read ({error})")
        return {}


def run_memory(
    bench: Bench, device: InstantAckServer, steps: list[int], budget_seconds: float = 3600
) -> dict[str, Any]:
    """RSS of one worker after `steps[0]` patients, then after `steps[1]` in total; growth in percent.

    A step that does not drain within the time budget is reported with the patients it reached."""
    phase, site = bench.phase("mem"), bench.site.site
    namespace = bench.namespace("m")
    device.reset()
    worker = bench.worker(phase, device.base_url).start()
    points: list[dict[str, Any]] = []
    deadline = time.monotonic() + budget_seconds
    try:
        worker.wait_ready()
        baseline = _rss_mib(bench, worker.rss, settle=2.0)
        bench.log(f"memory: worker RSS {baseline} MiB before any patient")
        loaded = 0
        for target in steps:
            batch = [patient(namespace, n) for n in range(loaded, target)]
            started = time.monotonic()
            bench.load(batch, timeout=1800)
            expected = {expected_ref(p, site) for p in batch}
            remaining = max(60.0, deadline - time.monotonic())

            def acknowledged(refs: set[str] = expected) -> bool:
                return device.log.seen(refs) == len(refs)

            try:
                bench.wait_drained(phase, acknowledged, timeout=remaining, poll=2.0)
            except TimeoutError:
                reached = loaded + device.log.seen(expected)
                points.append({"patients": reached, "rss_mib": _rss_mib(bench, worker.rss, 0), "complete": False})
                bench.log(f"memory: time budget spent at {reached} of {target} patients")
                break
            loaded = target
            rate = len(batch) / (time.monotonic() - started)
            points.append({"patients": loaded, "rss_mib": _rss_mib(bench, worker.rss), "complete": True})
            points[-1]["parts_mib"] = parts = _parts_mib(bench, worker)
            bench.log(
                f"memory: {loaded} patients in state ({rate:.0f}/s): worker RSS {points[-1]['rss_mib']} MiB "
                f"({', '.join(f'{part} {mib}' for part, mib in parts.items())})"
            )
    finally:
        worker.stop()
    return memory_result(baseline, points, steps, budget_seconds)


def memory_result(
    baseline: float, points: list[dict[str, Any]], steps: list[int], budget_seconds: float
) -> dict[str, Any]:
    """Growth from the first reading to the last; `complete` only when every step drained within the budget."""
    result: dict[str, Any] = {
        "data": "synthetic Patients (tests/casebuilder.py patient), one change each, through the bench database",
        "baseline_rss_mib": baseline,
        "steps": steps,
        "budget_seconds": budget_seconds,
        "points": points,
        "complete": len(points) == len(steps) and all(p["complete"] for p in points),
    }
    if len(points) >= 2 and points[0]["complete"]:
        first, last = points[0]["rss_mib"], points[-1]["rss_mib"]
        result["growth_percent"] = round(100.0 * (last - first) / first, 2)
        result["growth_between"] = [points[0]["patients"], points[-1]["patients"]]
    return result
