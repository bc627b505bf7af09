"""An accepted identity review moves a patient's earlier records to the Patient now named: through lost answers of
the target and SIGKILLs of the worker mid-move, every record ends at the right Patient, once, and nothing is
dead-lettered or reported as a conflict."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from pipeline.config import Config
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from tests.casebuilder import KVNR_SYSTEM, encounter_for, key_in_another_partition, observation_for, with_kvnr
from tests.faults.conftest import Central, SiteDatabase, _conflict_refs, cdrsync, wait_for, worker_behind
from tests.faults.proxy import Fault, FaultProxy

pytestmark = pytest.mark.faults
RECORDS = 40
LATER = 10


def test_a_move_through_lost_answers_and_worker_kills_moves_every_record_once(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path, config: Config
) -> None:
    kvnr = f"F{run_id}"
    key = global_patient_key(KVNR_SYSTEM, kvnr)
    corrected = key_in_another_partition(f"G{run_id}", key, config.topics.partitions_of("identified"))
    new_key = global_patient_key(KVNR_SYSTEM, corrected)
    person = with_kvnr({"resourceType": "Patient", "id": f"{run_id}-fm", "gender": "female"}, kvnr)
    encounter = encounter_for(f"{run_id}-fm", person["id"])
    encounter_id = target_id("site-a", "Encounter", encounter["id"])
    observations = [observation_for(f"{run_id}-fm", person["id"], n, 50.0 + n, encounter["id"]) for n in range(RECORDS)]
    ids = [target_id("site-a", "Observation", o["id"]) for o in observations]
    # Her next results, in the same encounter, sent while the move is under way: they are the new Patient's, in
    # its partition, which learns of the encounter from the move's hand-over.
    later = [
        observation_for(f"{run_id}-fm", person["id"], RECORDS + n, 60.0 + n, encounter["id"]) for n in range(LATER)
    ]
    later_ids = [target_id("site-a", "Observation", o["id"]) for o in later]

    def reviews() -> list[dict]:
        listed = cdrsync("identity", "list", "--site", "site-a", "--include-closed", "--json")
        return [r for r in map(orjson.loads, listed.splitlines()) if r["local_patient_id"] == person["id"]]

    with worker_behind(proxy, tmp_path) as worker:
        site_a.upsert_many([person, encounter, *observations])
        wait_for(lambda: all(stack.read("Observation", i) for i in ids), timeout=300, what="her records at central")
        site_a.upsert(with_kvnr(person, corrected))  # the hospital corrects her insurance number
        wait_for(reviews, timeout=120, what="the identity review")
        # The target applies some of the move's writes but their answers are lost; the worker dies twice mid-move.
        proxy.set(Fault("ambiguous", remaining=6, path_contains="Observation"))
        cdrsync("identity", "accept", "site-a", person["id"], "--reason", "fault test", "--execute")
        for n in range(2):
            time.sleep(2.0)
            worker.kill()
            site_a.upsert_many(later[n * LATER // 2 : (n + 1) * LATER // 2])
            worker.start()

        def at_new_patient() -> bool:
            return all(
                (stack.read("Observation", i) or {}).get("subject", {}).get("reference") == f"Patient/{new_key}"
                for i in ids + later_ids
            )

        what = f"all {RECORDS + LATER} records at the Patient now named"
        wait_for(at_new_patient, timeout=400, what=what, interval=3)
        assert stack.read("Encounter", encounter_id)["subject"]["reference"] == f"Patient/{new_key}"
        wait_for(lambda: stack.read("Patient", key) is None, timeout=120, what="the previous Patient deleted")
    assert stack.read("Patient", new_key) is not None
    moved_twice = []
    for observation, resource_id in zip(observations, ids, strict=True):
        versions = [v for v in stack.history("Observation", resource_id) if v is not None]
        subjects = [v["subject"]["reference"] for v in versions]
        assert set(subjects) == {f"Patient/{key}", f"Patient/{new_key}"}, subjects
        assert subjects == sorted(subjects, key=lambda s: s.endswith(new_key)), f"moved back: {subjects}"
        assert versions[-1]["valueQuantity"] == observation["valueQuantity"]  # only the reference changed
        moved_twice += [resource_id] if subjects.count(f"Patient/{new_key}") > 1 else []
    for resource_id in later_ids:  # never at the previous Patient
        versions = [v for v in stack.history("Observation", resource_id) if v is not None]
        assert {v["subject"]["reference"] for v in versions} == {f"Patient/{new_key}"}
    refs = {f"Observation/{i}" for i in ids + later_ids} | {f"Encounter/{encounter_id}"}
    assert not refs & _conflict_refs(), "a moved record reported as a conflict"
    letters = [orjson.loads(line) for line in cdrsync("dlq", "list", "--json", "--since", "30m").splitlines() if line]
    assert not [d for d in letters if d.get("target_ref") in refs | {f"Patient/{key}"}], "dead-lettered"
    lost_answers = proxy.counts["applied_then_dropped"]
    assert lost_answers >= 1, "no write of the move was faulted"
    print(
        f"\nRECONCILIATION identity move: {RECORDS} records moved, {LATER} later ones in the same encounter "
        f"written at the new Patient, {lost_answers} answers lost, 2 SIGKILLs, "
        f"{len(moved_twice)} written twice at the new Patient"
    )


def test_a_record_waiting_in_a_retry_topic_when_the_review_is_accepted_follows_the_move(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    kvnr, corrected = f"H{run_id}", f"J{run_id}"
    key, new_key = global_patient_key(KVNR_SYSTEM, kvnr), global_patient_key(KVNR_SYSTEM, corrected)
    person = with_kvnr({"resourceType": "Patient", "id": f"{run_id}-fr", "gender": "male"}, kvnr)
    earlier = [observation_for(f"{run_id}-fr", person["id"], n, 80.0 + n) for n in range(3)]
    late = observation_for(f"{run_id}-fr", person["id"], 9, 89.0)
    late_id = target_id("site-a", "Observation", late["id"])
    tiers = {f"CDRSYNC_RETRY_TIER{n}_SECONDS": "20" for n in (1, 2, 3)}

    def subject(resource_id: str) -> str | None:
        return (stack.read("Observation", resource_id) or {}).get("subject", {}).get("reference")

    with worker_behind(proxy, tmp_path, CDRSYNC_SINK_ATTEMPTS="2", **tiers) as worker:
        site_a.upsert_many([person, *earlier])
        ids = [target_id("site-a", "Observation", o["id"]) for o in earlier]
        wait_for(lambda: all(subject(i) for i in ids), timeout=300, what="her first records at central")
        # One more result, whose writes the target refuses for a while: it waits in a retry topic, bound for Patient K.
        proxy.set(Fault("status", 500, path_contains=late_id))
        retried = worker.metric("cdrsync_retries_total")
        site_a.upsert(late)
        wait_for(lambda: worker.metric("cdrsync_retries_total") > retried, timeout=120, what="the result retried")
        site_a.upsert(with_kvnr(person, corrected))
        wait_for(lambda: person["id"] in cdrsync("identity", "list", "--site", "site-a"), timeout=120, what="review")
        cdrsync("identity", "accept", "site-a", person["id"], "--reason", "fault test", "--execute")
        wait_for(lambda: all(subject(i) == f"Patient/{new_key}" for i in ids), timeout=300, what="the move")
        wait_for(lambda: stack.read("Patient", key) is None, timeout=120, what="the previous Patient deleted")
        proxy.clear()
        wait_for(lambda: subject(late_id) == f"Patient/{new_key}", timeout=300, what="the retried result", interval=3)
    versions = [v for v in stack.history("Observation", late_id) if v is not None]
    assert {v["subject"]["reference"] for v in versions} == {f"Patient/{new_key}"}  # never at the previous Patient
    assert versions[-1]["valueQuantity"] == late["valueQuantity"]
    letters = [orjson.loads(line) for line in cdrsync("dlq", "list", "--json", "--since", "30m").splitlines() if line]
    assert not [d for d in letters if d.get("target_ref") == f"Observation/{late_id}"], "dead-lettered"
    print("\nRECONCILIATION identity move: a result in a retry topic during the move followed it, none lost")
