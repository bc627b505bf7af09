"""The central FHIR server failing in every way a network and a server can, behind a fault proxy.

One worker writes through the proxy while a hospital keeps changing records. Each phase injects one
fault while a batch of changes flows; at the end every change is at the target exactly once, with
its latest content, in version order, and nothing was dead-lettered (every fault here is transient).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SOAK,
    Central,
    SiteDatabase,
    Worker,
    Workload,
    assert_clean,
    reconcile,
    settle,
    wait_for,
    worker_behind,
)
from tests.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.faults
DOWN_SECONDS = 300 if SOAK else 75


@pytest.fixture
def proxied_worker(proxy: FaultProxy, tmp_path: Path) -> Iterator[Worker]:
    with worker_behind(
        proxy,
        tmp_path,
        CENTRAL_FHIR_TIMEOUT_SECONDS="3",
        CDRSYNC_SINK_ATTEMPTS="3",
        CDRSYNC_RETRY_TIER1_SECONDS="5",
        CDRSYNC_RETRY_TIER2_SECONDS="10",
        CDRSYNC_RETRY_TIER3_SECONDS="20",
    ) as worker:
        yield worker


def _phase(workload: Workload, db: SiteDatabase, first: int, count: int) -> None:
    workload.load(db, workload.transactions(first, count), pause=0.05)


def test_target_faults_lose_and_duplicate_nothing(
    proxied_worker: Worker, proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    workload = Workload(f"{run_id}-t", patients=60)
    phases = [
        ("500 on writes, the server otherwise up: records wait in retry tiers", Fault("status", 500, remaining=12)),
        ("429 with Retry-After", Fault("status", 429, remaining=6, retry_after="2")),
        ("timeouts: writes hang past the client's 3 s", Fault("hang", remaining=6)),
        ("connections closed without an answer", Fault("close", remaining=8)),
        ("ambiguous writes: applied, answer lost", Fault("ambiguous", remaining=10)),
        ("503 on every request: circuit breaker holds", Fault("status", 503, writes_only=False)),
    ]
    per_phase = workload.patients // (len(phases) + 1)
    for n, (what, fault) in enumerate(phases):
        print(f"\nphase {n + 1}: {what}")
        proxy.set(fault)
        _phase(workload, site_a, n * per_phase, per_phase)
        if fault.remaining is None:
            time.sleep(30)
            assert proxied_worker.metric("cdrsync_target_breaker_open", target="central") == 1
            proxy.clear()
            wait_for(
                lambda: proxied_worker.metric("cdrsync_target_breaker_open", target="central") == 0,
                timeout=120,
                what="the circuit breaker to close once the target answers",
            )
        wait_for(lambda: proxy.fault is None, timeout=300, what=f"the fault of phase {n + 1} to be used up")
    print(f"\nphase {len(phases) + 1}: the server down (connection refused) for {DOWN_SECONDS}s")
    proxy.down()
    _phase(workload, site_a, len(phases) * per_phase, workload.patients - len(phases) * per_phase)
    time.sleep(DOWN_SECONDS)
    assert proxied_worker.metric("cdrsync_target_breaker_open", target="central") == 1
    proxy.up()
    settle(stack, workload, timeout=600)

    result = reconcile(stack, workload, dead_refs=set())
    print(f"proxy: {proxy.counts}")
    assert proxied_worker.metric("cdrsync_dead_letters_total") == 0, "a transient fault ended in a dead letter"
    assert proxied_worker.metric("cdrsync_target_outages_total", target="central") >= 2
    assert proxied_worker.metric("cdrsync_target_breaker_open", target="central") == 0
    assert proxy.counts["applied_then_dropped"] == 10
    assert_clean(result, "target faults")
