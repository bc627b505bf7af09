from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.ordering import (
    PENDING_REFERENCE_SYSTEM,
    OrderState,
    adopt_released,
    expire_parked,
    is_stale,
    older_message,
    order_record,
)
from pipeline.records import RoutedResource
from tests.casebuilder import routed_record

pytestmark = pytest.mark.unit


def rec(ref: str, deps: tuple[str, ...] = (), op: str = "CREATE", version: int = 1) -> RoutedResource:
    resource_type, target_id = ref.split("/")
    return routed_record(
        {},
        resource_type=resource_type,
        source_id=target_id,
        target_id=target_id,
        patient_key="p1",
        op=op,
        origin=("t", 0, version),
        source_version=version,
        content_hash=f"h{version}",
        dependencies=deps,
    )


def state() -> OrderState:
    return OrderState({}, {}, {}, {})


def test_observation_before_its_patient_waits_and_follows_it() -> None:
    s = state()
    assert order_record(s, rec("Observation/o1", ("Patient/p1",)), 0) == []
    released = order_record(s, rec("Patient/p1"), 0)
    assert [r.target_ref for r in released] == ["Patient/p1", "Observation/o1"]
    assert s.parked == {} and s.waiting == {}


def test_chain_patient_encounter_condition_released_in_dependency_order() -> None:
    s = state()
    order_record(s, rec("Condition/c1", ("Patient/p1", "Encounter/e1")), 0)
    order_record(s, rec("Encounter/e1", ("Patient/p1",)), 0)
    released = order_record(s, rec("Patient/p1"), 0)
    assert [r.target_ref for r in released] == ["Patient/p1", "Encounter/e1", "Condition/c1"]


def test_later_version_of_a_parked_resource_queues_behind_it() -> None:
    s = state()
    order_record(s, rec("Observation/o1", ("Patient/p1",), version=1), 0)
    order_record(s, rec("Observation/o1", ("Patient/p1",), version=2), 0)
    order_record(s, rec("Observation/o1", op="DELETE", version=3), 0)
    released = order_record(s, rec("Patient/p1"), 0)
    assert [(r.target_ref, r.source_version) for r in released] == [
        ("Patient/p1", 1),
        ("Observation/o1", 1),
        ("Observation/o1", 2),
        ("Observation/o1", 3),
    ]


def test_delete_is_released_at_once_and_forgets_the_resource() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    assert [r.op for r in order_record(s, rec("Patient/p1", op="DELETE", version=2), 0)] == ["DELETE"]
    assert order_record(s, rec("Observation/o1", ("Patient/p1",)), 0) == []


def test_parks_older_than_the_limit_expire_with_the_missing_reference() -> None:
    s = state()
    order_record(s, rec("Observation/o1", ("Patient/p9",)), 1_000, partition=3)
    order_record(s, rec("Observation/o2", ("Patient/p8",)), 5_000, partition=3)
    assert expire_parked(s, 2_000, 5_000, partition=3) == []
    expired = expire_parked(s, 6_000, 5_000, partition=3)
    assert [(p.record.target_ref, p.missing, p.since_ms) for p in expired] == [("Observation/o1", "Patient/p9", 1_000)]
    assert expire_parked(s, 60_000, 5_000, partition=1) == []  # other partitions' entries are not touched
    assert list(s.parked) == ["Patient/p8"]


def test_reference_cycle_encounter_condition_resolves_with_a_completion() -> None:
    s = state()
    encounter = rec("Encounter/e1", ("Patient/p1", "Condition/c1"))
    condition = rec("Condition/c1", ("Patient/p1", "Encounter/e1"))
    order_record(s, rec("Patient/p1"), 0)
    first = order_record(s, encounter, 0)
    assert [(r.target_ref, r.dependencies) for r in first] == [("Encounter/e1", ["Patient/p1"])]
    released = order_record(s, condition, 0)
    assert [r.target_ref for r in released] == ["Condition/c1", "Encounter/e1"]
    assert released[1] == encounter  # the full version, with its reference to the condition
    assert s.parked == {} and s.waiting == {}


def test_pending_reference_is_written_as_a_logical_reference() -> None:
    import orjson

    s = state()
    order_record(s, rec("Patient/p1"), 0)
    record = replace(
        rec("Observation/o2", ("Patient/p1", "Observation/o1")),
        resource='{"hasMember": [{"reference": "Observation/o1", "display": "x"}]}',
    )
    [degraded] = order_record(s, record, 0)
    assert orjson.loads(degraded.resource)["hasMember"] == [
        {
            "display": "x",
            "type": "Observation",
            "identifier": {"system": PENDING_REFERENCE_SYSTEM, "value": "Observation/o1"},
        }
    ]
    assert order_record(s, rec("Observation/o1", ("Patient/p1",)), 0)[1] == record


def test_newer_version_supersedes_a_parked_completion() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Observation/o2", ("Patient/p1", "Observation/o1"), version=1), 0)
    [v2] = order_record(s, rec("Observation/o2", ("Patient/p1",), version=2), 0)
    assert v2.source_version == 2
    assert s.parked == {} and s.waiting == {}
    assert [r.target_ref for r in order_record(s, rec("Observation/o1", ("Patient/p1",)), 0)] == ["Observation/o1"]


def test_completions_never_expire() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Observation/o2", ("Patient/p1", "Observation/o1")), 0)
    assert expire_parked(s, 10**12, 1, partition=0) == []
    assert s.waiting == {"Observation/o2": "Observation/o1"}


# Property: whatever order one patient's resources arrive in, every write names only resources written
# before it, versions of one resource never go backwards, and each resource ends at its latest version
# with all its references. The graph has a cycle (Encounter/e1 <-> Condition/c1), as FHIR allows.
PATIENT_GRAPH = {
    "Patient/p1": (),
    "Encounter/e1": ("Patient/p1", "Condition/c1"),
    "Encounter/e2": ("Patient/p1", "Encounter/e1"),
    "Coverage/v1": ("Patient/p1",),
    "Condition/c1": ("Patient/p1", "Encounter/e1"),
    "Observation/o1": ("Patient/p1", "Encounter/e2"),
    "Observation/o2": ("Patient/p1", "Encounter/e1", "Observation/o1", "Coverage/v1"),
    "DiagnosticReport/d1": ("Patient/p1", "Observation/o1", "Observation/o2"),
}


@st.composite
def arrivals(draw):
    versions = {ref: draw(st.integers(1, 3)) for ref in PATIENT_GRAPH}
    events = [(ref, v) for ref, n in versions.items() for v in range(1, n + 1)]
    shuffled = draw(st.permutations(events))
    # Keep each resource's versions in source order (the source topic is ordered per key).
    seen: dict[str, int] = {}
    ordered = []
    for ref, _ in shuffled:
        seen[ref] = seen.get(ref, 0) + 1
        ordered.append((ref, seen[ref]))
    return ordered


@settings(max_examples=400)
@given(arrivals())
def test_any_arrival_order_writes_references_first_and_ends_at_the_latest_version(events) -> None:
    s, released = state(), []
    for ref, version in events:
        released += order_record(s, rec(ref, PATIENT_GRAPH[ref], version=version), 0)
    written: set[str] = set()
    last: dict[str, RoutedResource] = {}
    for r in released:
        assert set(r.dependencies) <= written | {r.target_ref}, f"{r.target_ref} before {r.dependencies}"
        assert r.source_version >= getattr(last.get(r.target_ref), "source_version", 0)
        last[r.target_ref] = r
        written.add(r.target_ref)
    latest = {ref: max(v for e, v in events if e == ref) for ref in PATIENT_GRAPH}
    assert {ref: r.source_version for ref, r in last.items()} == latest
    assert all(sorted(r.dependencies) == sorted(PATIENT_GRAPH[ref]) for ref, r in last.items())
    assert s.parked == {} and s.waiting == {}


def test_delete_waits_until_what_references_it_is_deleted() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Observation/o1", ("Patient/p1",)), 0)
    assert order_record(s, rec("Patient/p1", op="DELETE", version=2), 0) == []
    released = order_record(s, rec("Observation/o1", op="DELETE", version=2), 0)
    assert [(r.target_ref, r.op) for r in released] == [("Observation/o1", "DELETE"), ("Patient/p1", "DELETE")]
    assert s.parked == {} and s.waiting == {} and s.released == {}


def test_delete_waits_until_the_referrer_drops_the_reference() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Observation/o1", ("Patient/p1",)), 0)
    order_record(s, rec("Observation/o2", ("Patient/p1", "Observation/o1")), 0)
    assert order_record(s, rec("Observation/o1", op="DELETE", version=2), 0) == []
    released = order_record(s, rec("Observation/o2", ("Patient/p1",), version=2), 0)
    assert [(r.target_ref, r.op) for r in released] == [("Observation/o2", "CREATE"), ("Observation/o1", "DELETE")]


def test_deleting_a_reference_cycle_is_one_delete() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Encounter/e1", ("Patient/p1", "Condition/c1")), 0)
    order_record(s, rec("Condition/c1", ("Patient/p1", "Encounter/e1")), 0)
    assert order_record(s, rec("Patient/p1", op="DELETE", version=2), 0) == []
    assert order_record(s, rec("Encounter/e1", op="DELETE", version=2), 0) == []
    released = order_record(s, rec("Condition/c1", op="DELETE", version=2), 0)
    assert [(r.target_ref, r.delete_with) for r in released] == [("Condition/c1", ["Encounter/e1"]), ("Patient/p1", [])]
    assert s.parked == {} and s.waiting == {} and s.released == {}


def test_recreating_a_resource_cancels_its_waiting_delete() -> None:
    s = state()
    order_record(s, rec("Patient/p1"), 0)
    order_record(s, rec("Observation/o1", ("Patient/p1",)), 0)
    order_record(s, rec("Patient/p1", op="DELETE", version=2), 0)
    [again] = order_record(s, rec("Patient/p1", version=3), 0)
    assert (again.op, again.source_version) == ("CREATE", 3)
    assert s.parked == {} and s.waiting == {}


@settings(max_examples=300)
@given(arrivals(), st.permutations(sorted(PATIENT_GRAPH)))
def test_deleting_everything_in_any_order_never_deletes_what_is_still_referenced(events, deletions) -> None:
    s, released = state(), []
    for ref, version in events:
        released += order_record(s, rec(ref, PATIENT_GRAPH[ref], version=version), 0)
    for ref in deletions:
        released += order_record(s, rec(ref, op="DELETE", version=9), 0)
    present: dict[str, set[str]] = {}  # what the target holds: ref -> the refs it references
    for r in released:
        if r.is_delete:
            group = {r.target_ref, *r.delete_with}
            for ref in group:
                present.pop(ref, None)
            still = [other for other, deps in present.items() if deps & group]
            assert not still, f"deleted {sorted(group)} while {still} reference it"
        else:
            present[r.target_ref] = set(r.dependencies)
    assert present == {}
    assert s.parked == {} and s.waiting == {} and s.released == {}


def test_staged_changes_reach_the_tables_only_when_applied() -> None:
    from pipeline.ordering import staged, staged_tables

    tables = state()
    order_record(tables, rec("Patient/p1"), 0)
    changes = staged(tables)
    order_record(changes, rec("Patient/p1", op="DELETE", version=2), 0)
    order_record(changes, rec("Observation/o1", ("Patient/p1",)), 0)
    assert "Patient/p1" in tables.released and tables.parked == {}  # a crash here leaves the tables as they were
    assert "Patient/p1" not in changes.released and list(changes.parked) == ["Patient/p1"]
    for table in staged_tables(changes):
        table.apply()
    assert "Patient/p1" not in tables.released and list(tables.parked) == ["Patient/p1"]
    assert tables.waiting == {"Observation/o1": "Patient/p1"}


def test_a_change_debezium_sends_again_after_a_newer_one_is_stale() -> None:
    s = state()
    v1 = replace(rec("Patient/p1", version=1), source_lsn=100)
    v2 = replace(rec("Patient/p1", version=2), source_lsn=200)
    order_record(s, v1, 0)
    order_record(s, v2, 0)
    assert is_stale(s, v1)  # re-sent after Kafka Connect died: older than what was seen
    assert not is_stale(s, v2)  # the same change again is written again (idempotent), not dropped
    assert not is_stale(s, replace(v1, site="site-b"))  # another hospital's LSNs are its own
    assert not is_stale(s, replace(v1, source_id="p2"))  # as are another local record's merged into it
    assert not is_stale(s, replace(v1, source_lsn=None))


def test_an_hl7_message_re_queued_after_a_later_one_is_older_whatever_its_lsn() -> None:
    """Inbox row 1 (a preliminary result) then row 2 (its correction) changed the resource; row 1 re-queued (its row
    updated) is read again with a new, higher LSN. By inbox row it is older: not written over the correction."""
    s = state()
    first = replace(rec("Observation/o1", version=1), source_lsn=100)
    correction = replace(rec("Observation/o1", version=2), source_lsn=200)
    order_record(s, first, 0, inbox_row=1)
    order_record(s, correction, 0, inbox_row=2)
    requeued = replace(first, op="UPDATE", source_lsn=300)
    assert not is_stale(s, requeued)  # by LSN it is the newest
    assert older_message(s, requeued, inbox_row=1) == 2
    assert older_message(s, replace(correction, op="UPDATE", source_lsn=400), inbox_row=2) is None  # the latest
    assert older_message(s, replace(requeued, source_lsn=500), inbox_row=3) is None  # a later message, updated
    assert older_message(s, requeued, inbox_row=None) is None  # another source: LSNs alone decide
    assert older_message(s, replace(requeued, site="site-b"), inbox_row=1) is None  # another hospital's inbox


def test_a_new_hl7_message_is_never_held_back_by_inbox_order_so_a_restarted_id_sequence_loses_nothing() -> None:
    """The inbox re-created, its ids start again at 1: a new message (an INSERT) is written, and is from then on the
    message the resource's re-queues are set against."""
    s = state()
    order_record(s, replace(rec("Observation/o1", version=1), source_lsn=100), 0, inbox_row=900)
    after_restart = replace(rec("Observation/o1", version=2), source_lsn=200)
    assert older_message(s, after_restart, inbox_row=1) is None
    order_record(s, after_restart, 0, inbox_row=1)
    assert older_message(s, replace(after_restart, op="UPDATE", source_lsn=300), inbox_row=1) is None


def test_a_later_message_s_inbox_row_goes_with_the_resource_when_its_patient_moves() -> None:
    """After an identity move, the new Patient's partition knows the resource's latest inbox row too."""
    before, after = state(), state()
    correction = replace(rec("Observation/o1", version=2), source_lsn=200)
    order_record(before, correction, 0, inbox_row=2)
    adopt_released(after, {"Observation/o1": before.released["Observation/o1"]}, dict(before.positions), 0)
    assert older_message(after, replace(correction, op="UPDATE", source_lsn=300), inbox_row=1) == 2


def test_a_hand_over_is_not_taken_for_a_later_change_by_its_inbox_row_alone() -> None:
    """What this partition released from a later change (by LSN) stands against a hand-over that only knows a
    higher inbox row (state from before inbox rows were kept has none)."""
    here = state()
    order_record(here, replace(rec("Observation/o1", version=3), source_lsn=500), 0)
    theirs = {"Observation/o1": {"site-a|o1": 200, "site-a|o1|inbox": 9}}
    entry = {**here.released["Observation/o1"], "deps": ["Encounter/elsewhere"]}
    adopt_released(here, {"Observation/o1": entry}, theirs, 0)
    assert "handed" not in here.released["Observation/o1"]


def test_a_delete_keeps_its_position_so_a_resent_create_does_not_bring_the_resource_back() -> None:
    s = state()
    order_record(s, replace(rec("Patient/p1", version=1), source_lsn=100), 0)
    order_record(s, replace(rec("Patient/p1", op="DELETE", version=2), source_lsn=200), 0)
    assert is_stale(s, replace(rec("Patient/p1", version=1), source_lsn=100))
