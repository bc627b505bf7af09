"""The worker's RocksDB directory is deleted: its tables are rebuilt from their changelog topics."""

from __future__ import annotations

import shutil

import pytest

from tests.faults.conftest import Central, SiteDatabase, Worker, Workload, assert_clean, reconcile, settle

pytestmark = pytest.mark.faults


def test_deleted_state_directory_is_rebuilt_from_changelogs(
    fault_worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    workload = Workload(f"{run_id}-s", patients=20, updates=3)
    plans = [workload.patient_batches(n) for n in range(workload.patients)]
    fault_worker.start()
    workload.load(site_a, [plan[0] for plan in plans])  # every patient and its observations
    settle(stack, workload, timeout=300)
    fault_worker.kill()
    shutil.rmtree(fault_worker.state_dir)
    # Updates of observations whose patients were released before the loss: with the order stage's
    # tables gone they would wait forever for a Patient that is never sent again.
    workload.load(site_a, [batch for plan in plans for batch in plan[1:]])
    workload.load(site_a, Workload(workload.prefix, patients=25, updates=0).transactions(20, 5))  # new patients
    fault_worker.start()
    settle(stack, workload, timeout=300)
    assert fault_worker.metric("cdrsync_parked_total") == 0, "a record waited for a reference released before"
    assert_clean(reconcile(stack, workload, dead_refs=set()), "state directory deleted")
