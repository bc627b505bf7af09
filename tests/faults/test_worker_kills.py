"""SIGKILL the worker again and again while a hospital keeps writing, and while records wait in retry tiers:
nothing lost, nothing doubled."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SOAK,
    Central,
    SiteDatabase,
    Worker,
    Workload,
    assert_clean,
    load_in_background,
    reconcile,
    settle,
    wait_for,
    worker_behind,
)
from tests.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.faults
KILLS = 30 if SOAK else 10


def test_repeated_sigkill_mid_batch(fault_worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str) -> None:
    workload = Workload(f"{run_id}-k", patients=200 if SOAK else 60)
    rng = random.Random(11)
    fault_worker.start()
    loader = load_in_background(workload, site_a, pause=0.15)
    for _ in range(KILLS):
        time.sleep(rng.uniform(1.0, 4.0))  # mid-batch: the loader keeps the worker busy
        fault_worker.kill()
        fault_worker.start()
    loader.join()
    settle(stack, workload, timeout=600)
    assert_clean(reconcile(stack, workload, dead_refs=set()), f"worker SIGKILL x{KILLS}")


def test_records_waiting_in_retry_tiers_survive_a_sigkill(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    workload = Workload(f"{run_id}-r", patients=12)
    tiers = {f"CDRSYNC_RETRY_TIER{n}_SECONDS": "30" for n in (1, 2, 3)}
    with worker_behind(proxy, tmp_path, CDRSYNC_SINK_ATTEMPTS="2", **tiers) as worker:
        proxy.set(Fault("status", 500))  # every write fails (the server is otherwise up): records go to tier 1
        workload.load(site_a, workload.transactions(), pause=0.05)
        wait_for(lambda: worker.metric("cdrsync_retries_total") >= 10, timeout=180, what="records in a retry tier")
        worker.kill()  # while they wait for their tier's delay, some perhaps being moved on
        proxy.clear()
        worker.start()
        settle(stack, workload, timeout=400)
    assert_clean(reconcile(stack, workload, dead_refs=set()), "worker SIGKILL while records waited in retry tiers")
