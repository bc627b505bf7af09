"""What moving a site's records from one central Patient to another changes (pipeline/patientmove.py): the
references and nothing else, cdrsync's mark kept truthful, and the previous Patient without the site."""

from __future__ import annotations

import orjson
import pytest

from pipeline.merge import merge_patient
from pipeline.ordering import OrderState, order_record
from pipeline.patientmove import moved_to, order_move, redirect, rewritten
from pipeline.provenance import add_provenance, provenance_id
from pipeline.records import decode, encode
from pipeline.sink import body_to_write, untouched_write
from tests.casebuilder import move_of, routed_record

pytestmark = pytest.mark.unit
OLD, NEW = "0f6c2b1e-0000-5000-8000-00000000000a", "0f6c2b1e-0000-5000-8000-00000000000b"


def written(resource: dict, lsn: int = 7) -> dict:
    """The resource as the sink wrote it (its content hash and written-by mark), with the meta a server adds."""
    record = routed_record(resource, patient_key=OLD, source_lsn=lsn)
    body = orjson.loads(body_to_write(record))
    return {**body, "meta": {**body.get("meta", {}), "versionId": "3", "lastUpdated": "2026-12-01T10:00:00Z"}}


OBSERVATION = {
    "resourceType": "Observation",
    "id": "obs-1",
    "status": "final",
    "code": {"text": "weight"},
    "subject": {"reference": f"Patient/{OLD}"},
    "performer": [{"reference": "Practitioner/pr-1"}, {"reference": f"Patient/{OLD}/_history/2"}],
    "valueQuantity": {"value": 64.0, "unit": "kg"},
    "meta": {"tag": [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]},
}


def test_only_references_to_the_previous_patient_change_and_the_mark_matches_the_new_body() -> None:
    before = written(OBSERVATION)
    after = rewritten(before, OLD, NEW)
    assert after is not None
    assert after["subject"] == {"reference": f"Patient/{NEW}"}
    assert after["performer"] == [{"reference": "Practitioner/pr-1"}, {"reference": f"Patient/{NEW}"}]
    assert after["valueQuantity"] == OBSERVATION["valueQuantity"] and after["code"] == OBSERVATION["code"]
    assert after["meta"] == {"tag": OBSERVATION["meta"]["tag"]}  # the server's own meta is not sent back
    # Still recognisably cdrsync's own write of the same source row and position, so the hospital's next version
    # of it is written over it, not reported as a conflict.
    assert untouched_write(before) == untouched_write(after) == ("site-a|obs-1", 7)


def test_a_resource_edited_at_the_target_moves_with_its_edit_and_stays_an_edit() -> None:
    edited = {**written(OBSERVATION), "note": [{"text": "added by a clinician at the centre"}]}
    assert untouched_write(edited) is None
    after = rewritten(edited, OLD, NEW)
    assert after is not None and after["subject"] == {"reference": f"Patient/{NEW}"}
    assert after["note"] == edited["note"]
    assert untouched_write(after) is None  # a later change from the hospital is a conflict, not an overwrite


def test_a_resource_not_naming_the_previous_patient_is_left_alone() -> None:
    other = written({**OBSERVATION, "subject": {"reference": "Patient/someone-else"}, "performer": []})
    assert rewritten(other, OLD, NEW) is None


def site_patient(site: str, mrn: str) -> object:
    body = {
        "resourceType": "Patient",
        "id": OLD,
        "name": [{"family": f"from {site}"}],
        "identifier": [{"system": f"urn:mrn:{site}", "value": mrn}],
        "meta": {"tag": [{"system": "urn:cdrsync:origin-site", "code": site}]},
    }
    return routed_record(body, site=site, source_id=mrn, patient_key=OLD)


def request(site: str = "site-a", local: str = "a-1"):
    return move_of(OLD, NEW, site=site, local=local, lsn=99)


def test_a_move_request_survives_its_topic_and_names_where_it_goes() -> None:
    move = decode(encode(request()), type(request()))
    assert move.op == "MOVE" and move.target_ref == f"Patient/{OLD}" and moved_to(move) == NEW
    assert move.source_commit_ms == 1_700_000_000_000  # the decision's time, not the reviewed version's


def released_observation(state: OrderState, name: str) -> None:
    ref = f"Observation/{name}"
    observation = routed_record(
        {"resourceType": "Observation", "id": name},
        resource_type="Observation",
        target_id=name,
        patient_key=OLD,
        dependencies=[f"Patient/{OLD}"],
    )
    assert [r.target_ref for r in order_record(state, observation, 0)] == [ref]


def test_the_only_hospital_of_the_previous_patient_leaving_deletes_it_after_the_move() -> None:
    state, patients = OrderState({}, {}, {}, {}), {}
    merge_patient(patients, site_patient("site-a", "a-1"))
    order_record(state, site_patient("site-a", "a-1"), 0)
    released_observation(state, "obs-1")
    out, redirected, _, _ = order_move(state, patients, request(), 1)
    assert [(r.op, r.target_ref) for r in out] == [("MOVE", f"Patient/{OLD}"), ("DELETE", f"Patient/{OLD}")]
    assert patients[OLD] == {"sites": [], "versions": {}, "moved": {"site-a": NEW}} and redirected == []
    # The delete is not held for the observation that referenced the Patient: it moved, and its entry went with
    # it to the new Patient's partition (tests/unit/test_handover.py).
    assert "Observation/obs-1" not in state.released
    assert state.parked == {}


def test_a_previous_patient_other_hospitals_hold_loses_only_the_leaving_sites_identifiers() -> None:
    state, patients = OrderState({}, {}, {}, {}), {}
    for site, mrn in (("site-a", "a-1"), ("site-b", "b-1")):
        merge_patient(patients, site_patient(site, mrn))
    out, _, _, _ = order_move(state, patients, request(), 1)
    site_a_provenance = f"Provenance/{provenance_id('site-a', f'Patient/{OLD}')}"
    assert [(r.op, r.target_ref) for r in out] == [
        ("MOVE", f"Patient/{OLD}"),
        ("UPDATE", f"Patient/{OLD}"),
        ("DELETE", site_a_provenance),  # site-a is no source of that person any more
    ]
    body = orjson.loads(out[1].resource)
    assert body["identifier"] == [{"system": "urn:mrn:site-b", "value": "b-1"}]
    assert body["name"] == [{"family": "from site-b"}] and patients[OLD]["sites"] == ["site-b"]
    # Provenance wiring leaves that delete as it is (no Provenance of a Provenance to delete with it).
    assert add_provenance(out[2:], {}, patients, ["site-a", "site-b"]) == out[2:]


def test_a_move_sent_again_after_the_site_left_writes_the_previous_patient_as_it_is_now() -> None:
    # The MOVE of a second target, or one sent again (a crash, `cdrsync identity move`): that target gets the
    # previous Patient without the site too, and nothing in the tables changes.
    state, patients = OrderState({}, {}, {}, {}), {}
    for site, mrn in (("site-a", "a-1"), ("site-b", "b-1")):
        merge_patient(patients, site_patient(site, mrn))
    first, _, _, _ = order_move(state, patients, request(), 1)
    before = {k: dict(v) for k, v in patients.items()}
    again, _, _, _ = order_move(state, patients, request(), 2)
    assert [(r.op, r.target_ref) for r in again] == [(r.op, r.target_ref) for r in first]
    assert again[1].resource == first[1].resource and patients == before


def test_the_site_s_records_on_their_way_to_the_previous_patient_follow_its_move() -> None:
    state, patients = OrderState({}, {}, {}, {}), {}
    merge_patient(patients, site_patient("site-a", "a-1"))
    order_record(state, site_patient("site-a", "a-1"), 0)
    # An observation waiting for the Patient it names to be written here (e.g. after a crash lost the release).
    waiting = observation_of("obs-2", "site-a")
    assert order_record(OrderState({}, state.parked, state.waiting, {}), waiting, 0) == []
    _, redirected, _, _ = order_move(state, patients, request(), 1)
    assert [(r.target_ref, r.patient_key, r.dependencies) for r in redirected] == [
        ("Observation/obs-2", NEW, [f"Patient/{NEW}"])
    ]
    assert orjson.loads(redirected[0].resource)["subject"] == {"reference": f"Patient/{NEW}"}
    assert state.parked.get(f"Patient/{OLD}", []) == []
    # One arriving later is sent on as well; another hospital's is not, nor the site's Patient.
    assert redirect(patients, observation_of("obs-3", "site-a")).patient_key == NEW
    assert redirect(patients, observation_of("obs-4", "site-b")) is None
    assert redirect(patients, site_patient("site-a", "a-2")) is None


def test_the_site_sending_a_patient_to_the_previous_one_again_ends_the_redirect() -> None:
    state, patients = OrderState({}, {}, {}, {}), {}
    merge_patient(patients, site_patient("site-a", "a-1"))
    order_move(state, patients, request(), 1)
    merge_patient(patients, site_patient("site-a", "a-7"))  # another of its patients has that number
    assert "moved" not in patients[OLD] and redirect(patients, observation_of("obs-5", "site-a")) is None


def observation_of(name: str, site: str):
    body = {"resourceType": "Observation", "id": name, "subject": {"reference": f"Patient/{OLD}"}}
    return routed_record(
        body, site=site, resource_type="Observation", target_id=name, patient_key=OLD, dependencies=[f"Patient/{OLD}"]
    )


def test_a_move_gets_no_provenance_of_its_own() -> None:
    patients = {OLD: {"sites": ["site-b"], "versions": {}}}  # site-a already taken out of it
    out = add_provenance([request()], {}, patients, ["site-a", "site-b"])
    assert [r.op for r in out] == ["MOVE"]


def test_the_moved_records_no_longer_hold_up_a_later_delete_of_the_previous_patient() -> None:
    state, patients = OrderState({}, {}, {}, {}), {}
    for site, mrn in (("site-a", "a-1"), ("site-b", "b-1")):
        merge_patient(patients, site_patient(site, mrn))
        order_record(state, site_patient(site, mrn), 0)
    for name, site in (("obs-a", "site-a"), ("obs-b", "site-b")):
        assert [r.target_ref for r in order_record(state, observation_of(name, site), 0)] == [f"Observation/{name}"]
    order_move(state, patients, request(), 1)  # site-b still holds the previous Patient: it is updated
    assert "Observation/obs-a" not in state.released  # gone with site-a to the new Patient's partition
    assert state.released["Observation/obs-b"]["deps"] == [f"Patient/{OLD}"]
    # site-b lets the patient go: the Patient's delete waits for site-b's observation only, not the moved one.
    delete = routed_record(
        None, resource_type="Patient", source_id="b-1", target_id=OLD, patient_key=OLD, op="DELETE", site="site-b"
    )
    assert order_record(state, delete, 2) == [] and set(state.parked) == {"~Observation/obs-b"}
