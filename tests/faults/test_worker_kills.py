"""SIGKILL the worker again and again while a hospital keeps writing: nothing lost, nothing doubled."""

from __future__ import annotations

import random
import time

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
)

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
