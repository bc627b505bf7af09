"""The worker's RocksDB directory is deleted: its tables are rebuilt from their changelog topics, the order
stage's and the trigger's."""

from __future__ import annotations

import shutil

import pytest

from pipeline.identity import global_patient_key
from tests.casebuilder import KVNR_SYSTEM, kvnr_of, observation_for, patient, tumorboard_flag
from tests.faults.conftest import Central, SiteDatabase, Worker, Workload, assert_clean, reconcile, settle, wait_for
from tests.integration.test_trigger import _at_b, _encounter, _in_encounter, _wait_held

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


def test_records_a_trigger_keeps_back_survive_the_loss_of_the_state_directory(
    fault_worker: Worker, stack: Central, site_b: SiteDatabase, run_id: str
) -> None:
    """site-b sends only what a tumour-board flag selects; what it keeps back until then lives in the order
    stage's trigger tables. Losing the worker's disk must not lose it: the flag still sends all of it."""
    person = patient(f"{run_id}-tl", 1)
    encounter = _encounter(f"{run_id}-tl-enc", person["id"])
    observations = [
        _in_encounter(observation_for(f"{run_id}-tl", person["id"], n, 60.0 + n), encounter["id"]) for n in (1, 2, 3)
    ]
    fault_worker.start()
    site_b.upsert_many([person, encounter, *observations])
    for source_id in [person["id"], encounter["id"], *(o["id"] for o in observations)]:
        _wait_held(source_id)
    key = global_patient_key(KVNR_SYSTEM, kvnr_of(person["id"]))
    assert stack.read("Patient", key) is None

    fault_worker.kill()
    shutil.rmtree(fault_worker.state_dir)
    fault_worker.start()
    site_b.upsert(tumorboard_flag(f"{run_id}-tl-flag", person["id"], encounter["id"]))
    wait_for(lambda: stack.read("Patient", key), timeout=180, what="the flagged patient at central")
    for resource_type, source_id in [("Encounter", encounter["id"]), *(("Observation", o["id"]) for o in observations)]:
        body = wait_for(
            lambda t=resource_type, s=source_id: stack.read(t, _at_b(t, s)), timeout=120, what=f"backfilled {source_id}"
        )
        assert body["subject"]["reference"] == f"Patient/{key}"
