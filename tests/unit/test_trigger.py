"""The tumour-board trigger: what a `trigger: tumorboard-flag` route sends, backfills and keeps back."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import load_config
from pipeline.records import RoutedResource, decode
from pipeline.trigger import (
    TRIGGER_ALL,
    TRIGGER_TUMORBOARD,
    TriggerTables,
    held_refs,
    route_trigger,
    select_records,
    tumorboard_flag,
)
from tests.casebuilder import routed_record
from tests.conftest import ROOT

pytestmark = pytest.mark.unit
TB = TRIGGER_TUMORBOARD


def rec(
    ref: str,
    patient: str = "p1",
    deps: tuple[str, ...] = (),
    op: str = "CREATE",
    body: dict[str, Any] | None = None,
    version: int = 1,
) -> RoutedResource:
    resource_type, target_id = ref.split("/")
    content = body if body is not None else {"resourceType": resource_type, "id": target_id}
    return routed_record(
        content,
        site="site-b",
        resource_type=resource_type,
        source_id=target_id,
        target_id=target_id,
        patient_key=patient,
        op=op,
        origin=("t", 0, version),
        source_version=version,
        content_hash=f"h{version}",
        dependencies=deps,
    )


def flag(flag_id: str, encounter: str | None, status: str = "active", patient: str = "p1") -> RoutedResource:
    body: dict[str, Any] = {
        "resourceType": "Flag",
        "id": flag_id,
        "status": status,
        "code": {"coding": [{"system": "urn:cdrsync:flag", "code": "tumorboard"}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    deps = [f"Patient/{patient}"]
    if encounter:
        body["encounter"] = {"reference": encounter}
        deps.append(encounter)
    return rec(f"Flag/{flag_id}", patient, tuple(deps), body=body)


def refs(records: list[RoutedResource]) -> list[str]:
    return [r.target_ref for r in records]


def test_all_route_sends_everything_and_keeps_no_state() -> None:
    states = TriggerTables({}, {}, {})
    observation = rec("Observation/o1", deps=("Patient/p1",))
    assert refs(select_records(states, observation, TRIGGER_ALL).send) == ["Observation/o1"]
    assert states == TriggerTables({}, {}, {})


def test_unflagged_patient_sends_nothing_and_keeps_the_latest_versions() -> None:
    states = TriggerTables({}, {}, {})
    for record in [
        rec("Patient/p1"),
        rec("Encounter/e1", deps=("Patient/p1",)),
        rec("Observation/o1", deps=("Encounter/e1",), version=2),
    ]:
        selection = select_records(states, record, TB)
        assert selection.send == [] and selection.held
    assert held_refs(states, "site-b", "central", "p1") == ["Encounter/e1", "Observation/o1", "Patient/p1"]


def test_flag_backfills_its_encounter_what_references_it_patient_and_coverage_in_rank_order() -> None:
    states = TriggerTables({}, {}, {})
    earlier = [
        rec("Observation/o1", deps=("Patient/p1", "Encounter/e1")),
        rec("Observation/other", deps=("Patient/p1", "Encounter/e2")),  # another encounter: stays
        rec("Encounter/e1", deps=("Patient/p1",)),
        rec("Encounter/e2", deps=("Patient/p1",)),
        rec("Coverage/c1", deps=("Patient/p1",)),
        rec("Patient/p1"),
    ]
    for record in earlier:
        assert select_records(states, record, TB).send == []
    selection = select_records(states, flag("f1", "Encounter/e1"), TB)
    assert refs(selection.send) == ["Patient/p1", "Coverage/c1", "Encounter/e1", "Observation/o1", "Flag/f1"]
    assert sorted(refs(selection.backfilled)) == ["Coverage/c1", "Encounter/e1", "Observation/o1", "Patient/p1"]
    assert selection.flag == "Flag/f1"
    assert held_refs(states, "site-b", "central", "p1") == ["Encounter/e2", "Observation/other"]
    later = select_records(states, rec("Observation/o2", deps=("Patient/p1", "Encounter/e1")), TB)
    assert refs(later.send) == ["Observation/o2"] and later.backfilled == []


def test_inactive_flag_stops_new_sends_its_own_change_is_sent_and_reactivation_backfills() -> None:
    states = TriggerTables({}, {}, {})
    select_records(states, rec("Patient/p1"), TB)
    select_records(states, flag("f1", "Encounter/e1"), TB)
    select_records(states, rec("Encounter/e1", deps=("Patient/p1",)), TB)
    assert refs(select_records(states, flag("f1", "Encounter/e1", status="inactive"), TB).send) == ["Flag/f1"]
    changed = rec("Encounter/e1", deps=("Patient/p1",), version=2)
    assert select_records(states, changed, TB).send == []
    assert select_records(states, rec("Observation/o9", deps=("Encounter/e1",)), TB).send == []
    again = select_records(states, flag("f1", "Encounter/e1"), TB)
    assert refs(again.send) == ["Encounter/e1", "Observation/o9", "Flag/f1"]  # the Patient did not change
    assert [r.source_version for r in again.send if r.resource_type == "Encounter"] == [2]


def test_delete_is_sent_only_for_what_was_sent() -> None:
    states = TriggerTables({}, {}, {})
    select_records(states, rec("Observation/o1", deps=("Encounter/e1",)), TB)
    select_records(states, rec("Observation/o1", op="DELETE"), TB)
    assert held_refs(states, "site-b", "central", "p1") == []  # nothing sent, nothing to delete
    assert states.resources == {}
    select_records(states, flag("f1", "Encounter/e1"), TB)
    select_records(states, rec("Observation/o2", deps=("Encounter/e1",)), TB)
    assert refs(select_records(states, rec("Observation/o2", op="DELETE"), TB).send) == ["Observation/o2"]


def test_flag_without_encounter_selects_patient_coverage_and_the_flag_only() -> None:
    states = TriggerTables({}, {}, {})
    for record in [
        rec("Patient/p1"),
        rec("Coverage/c1"),
        rec("Encounter/e1"),
        rec("Observation/o1", deps=("Encounter/e1",)),
    ]:
        select_records(states, record, TB)
    assert refs(select_records(states, flag("f1", None), TB).send) == ["Patient/p1", "Coverage/c1", "Flag/f1"]


def test_other_flags_and_other_patients_are_not_triggers() -> None:
    assert (
        tumorboard_flag({"resourceType": "Flag", "status": "active", "code": {"coding": [{"code": "fall-risk"}]}})
        is None
    )
    states = TriggerTables({}, {}, {})
    select_records(states, rec("Observation/x", patient="p2", deps=("Encounter/e1",)), TB)
    select_records(states, flag("f1", "Encounter/e1", patient="p1"), TB)
    assert held_refs(states, "site-b", "central", "p2") == ["Observation/x"]


def test_route_trigger_comes_from_the_site_file() -> None:
    config = load_config(ROOT)
    assert route_trigger(config, rec("Patient/p1")) == TB  # sites/site-b.yaml
    assert route_trigger(config, RoutedResource(0, 0, "t", 0, 0, site="site-a", target="central")) == TRIGGER_ALL


_patients = st.sampled_from(["p1", "p2", "p3"])


@st.composite
def _record(draw: st.DrawFn) -> RoutedResource:
    """A change of one of three patients; ids are the patient's own, as target ids are (uuid5 per resource)."""
    patient = draw(_patients)
    kind = draw(st.sampled_from(["Patient", "Encounter", "Observation", "Coverage", "Flag", "delete"]))
    encounter = f"Encounter/{patient}-e{draw(st.integers(1, 2))}"
    n = draw(st.integers(0, 3))
    if kind == "Flag":
        status = draw(st.sampled_from(["active", "inactive"]))
        return flag(f"{patient}-f{n % 2}", encounter, status, patient)
    if kind == "Patient":
        return rec(f"Patient/{patient}", patient)
    if kind == "Encounter":
        return rec(encounter, patient, (f"Patient/{patient}",))
    if kind == "delete":
        return rec(f"Observation/{patient}-o{n}", patient, op="DELETE")
    deps = (f"Patient/{patient}", encounter) if draw(st.booleans()) else (f"Patient/{patient}",)
    return rec(f"{kind}/{patient}-{kind[0].lower()}{n}", patient, deps)


@settings(max_examples=300, deadline=None)
@given(st.lists(_record(), max_size=40))
def test_nothing_of_a_patient_without_an_active_flag_is_ever_sent(records: list[RoutedResource]) -> None:
    states = TriggerTables({}, {}, {})
    ever_flagged: set[str] = set()
    sent_refs: set[tuple[str, str]] = set()
    for record in records:
        selection = select_records(states, record, TB)
        active = states.flags.get(f"site-b|central|{record.patient_key}", {}).get("flags", {})
        for item in selection.send:
            assert item.patient_key == record.patient_key, "a record only ever releases its own patient's records"
            if not active:  # only a withdrawn flag's own change, and only where the flag went before
                assert item.resource_type == "Flag", "sent without an active tumour-board flag"
                assert (item.patient_key, item.target_ref) in sent_refs
            else:
                ever_flagged.add(item.patient_key)
            sent_refs.add((item.patient_key, item.target_ref))
    never = {r.patient_key for r in records} - ever_flagged
    for patient in never:
        assert not any(p == patient for p, _ in sent_refs)


@settings(max_examples=300, deadline=None)
@given(st.lists(_record(), max_size=40))
def test_every_record_is_sent_or_kept_unless_no_flag_could_ever_select_it(records: list[RoutedResource]) -> None:
    states = TriggerTables({}, {}, {})
    for record in records:
        selection = select_records(states, record, TB)
        _assert_index_consistent(states)
        entry = states.resources.get(f"site-b|central|{record.target_ref}", {})
        if record in selection.send or "held" in entry:
            continue
        if record.is_delete:
            assert not entry.get("sent"), "a delete of something sent must be sent or kept"
        else:
            assert record.resource_type not in ("Patient", "Coverage", "Encounter")
            assert not any(d.startswith("Encounter/") for d in record.dependencies)


def _assert_index_consistent(states: TriggerTables) -> None:
    """Every indexed ref has a held version listing that anchor, and every held version is indexed."""
    for key, refs in states.held.items():
        site, target, _patient, anchor = key.split("|", 3)
        assert refs and len(refs) == len(set(refs))
        for ref in refs:
            assert anchor in states.resources[f"{site}|{target}|{ref}"]["anchors"]
    for key, entry in states.resources.items():
        site, target, ref = key.split("|", 2)
        assert entry.get("sent") or entry.get("held")
        if entry.get("held"):
            patient = decode(base64.b64decode(entry["held"]), RoutedResource).patient_key
            for anchor in entry["anchors"]:
                assert ref in states.held[f"{site}|{target}|{patient}|{anchor}"]


def test_a_resource_moved_to_another_patient_leaves_the_first_patients_state() -> None:
    states = TriggerTables({}, {}, {})
    select_records(states, rec("Observation/o1", "p1", ("Encounter/e1",)), TB)
    select_records(states, rec("Observation/o1", "p2", ("Encounter/e9",), version=2), TB)
    assert held_refs(states, "site-b", "central", "p1") == []
    assert held_refs(states, "site-b", "central", "p2") == ["Observation/o1"]
    assert select_records(states, flag("f1", "Encounter/e1", patient="p1"), TB).backfilled == []


def test_no_state_value_grows_with_the_patients_history() -> None:
    states = TriggerTables({}, {}, {})
    for n in range(300):
        select_records(states, rec(f"Observation/o{n}", deps=("Patient/p1", f"Encounter/e{n % 100}")), TB)
    assert max(len(orjson.dumps(value)) for value in states.held.values()) < 100
    assert max(len(orjson.dumps(value)) for value in states.flags.values() or [{}]) < 100
