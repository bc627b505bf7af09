"""A move's hand-over between order partitions (pipeline/patientmove.py `handover_records`, `take_over`).

Each partition of the order stage keeps its own tables and cannot read another's. When an accepted identity
review moves a hospital's patient from the central Patient K to P, the hospital's later records are P's and go
to P's partition: what K's partition knew of them (released, parked, source positions) must go there too, or
they wait for resources that partition never saw written. Each test runs one OrderState per partition.
"""

from __future__ import annotations

import orjson
import pytest

from pipeline.merge import merge_patient
from pipeline.ordering import PENDING_REFERENCE_SYSTEM, OrderState, expire_parked, order_record
from pipeline.patientmove import HANDOVER, MoveOrder, handover_records, is_handover, order_move, take_over
from pipeline.records import RoutedResource, decode, encode
from tests.casebuilder import move_of, routed_record
from tests.casebuilder import patient_resource as res
from tests.casebuilder import patient_version as patient

pytestmark = pytest.mark.unit

K, P, Q = "k0000000-0000-5000-8000-000000000000", "p0000000-0000-5000-8000-000000000000", "q0" + "0" * 34
K_PART, P_PART, Q_PART = 0, 4, 5


def partition(key: str, patients: dict, *sites: str) -> OrderState:
    """A partition holding the Patient `key`, sent by `sites` (site-a by default)."""
    state = OrderState({}, {}, {}, {})
    for n, site in enumerate(sites or ("site-a",)):
        record = patient(key, site, f"{site[-1]}-{n + 1}")
        merge_patient(patients, record)
        order_record(state, record, 0, K_PART)
    return state


def move(previous: str, new: str) -> RoutedResource:
    return move_of(previous, new)


def refs(records: list[RoutedResource]) -> list[tuple[str, str]]:
    return [(r.op, r.target_ref) for r in records]


def handed(records: list[RoutedResource]) -> dict:
    return {ref: entry for r in records for ref, entry in orjson.loads(r.resource)["released"].items()}


def take_all(state: OrderState, patients: dict, records: list[RoutedResource], part: int) -> MoveOrder:
    out = MoveOrder([], [], [])
    for record in records:
        step = take_over(state, patients, decode(encode(record), RoutedResource), 50, part)  # via the topic
        out = MoveOrder(out.to_sink + step.to_sink, out.redirected + step.redirected, out.handover + step.handover)
    return out


def test_the_site_s_released_resources_go_to_the_new_patient_s_partition_and_leave_the_previous_one() -> None:
    pk: dict = {}
    k = partition(K, pk, "site-a", "site-b")
    for record in (res("Encounter", "enc-a", K), res("Encounter", "enc-b", K, site="site-b")):
        assert len(order_record(k, record, 0, K_PART)) == 1
    assert len(order_record(k, res("Observation", "obs-a", K, "Encounter/enc-a"), 0, K_PART)) == 1

    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    assert [(r.op, r.target_id, r.patient_key) for r in handover] == [(HANDOVER, K, P)]
    assert is_handover(handover[0]) and not is_handover(move(K, P))
    entries = handed(handover)
    assert set(entries) == {"Encounter/enc-a", "Observation/obs-a"}  # site-b's encounter stays with site-b's patient
    assert sorted(entries["Observation/obs-a"]["deps"]) == ["Encounter/enc-a", f"Patient/{P}"]
    assert set(orjson.loads(handover[0].resource)["positions"]) == {"Encounter/enc-a", "Observation/obs-a"}
    # They left K's partition with the site: K keeps site-b's and its own Patient.
    assert set(k.released) == {f"Patient/{K}", "Encounter/enc-b"}
    assert "Observation/obs-a" not in k.positions


def test_only_the_site_s_resources_are_handed_over_when_the_previous_patient_is_deleted() -> None:
    pk: dict = {}
    k = partition(K, pk)
    order_record(k, res("Observation", "obs-b", K, site="site-b"), 0, K_PART)  # another hospital's, left at K
    order_record(k, res("Observation", "obs-a", K), 0, K_PART)
    out, _, handover, _ = order_move(k, pk, move(K, P), 1, K_PART)
    assert set(handed(handover)) == {"Observation/obs-a"}
    p = partition(P, {})
    take_all(p, {}, handover, P_PART)
    gone = routed_record(None, resource_type="Patient", source_id="a-1", target_id=P, patient_key=P, op="DELETE")
    assert refs(order_record(p, gone, 60, P_PART)) == []  # it waits for obs-a only, which the site deletes
    assert set(p.parked) == {"~Observation/obs-a"}
    # K's delete waits for site-b's observation, which the sink does not move (the target would refuse it).
    assert ("DELETE", f"Patient/{K}") not in refs(out) and set(k.parked) == {"~Observation/obs-b"}


def test_entries_released_before_they_named_their_site_go_by_their_positions() -> None:
    pk: dict = {}
    k = partition(K, pk, "site-a", "site-b")
    for record in (res("Encounter", "enc-a", K), res("Encounter", "enc-b", K, site="site-b")):
        order_record(k, record, 0, K_PART)
        k.released[record.target_ref] = {key: v for key, v in k.released[record.target_ref].items() if key != "site"}
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    assert set(handed(handover)) == {"Encounter/enc-a"} and "Encounter/enc-b" in k.released


def test_what_the_site_s_records_reference_of_another_patient_is_copied_not_taken() -> None:
    pk: dict = {}
    k = partition(K, pk)
    mother = "m0000000-0000-5000-8000-000000000000"  # another patient, in the same partition
    order_record(k, patient(mother, "site-a", "a-9"), 0, K_PART)
    order_record(k, res("Encounter", "enc-mother", mother), 0, K_PART)
    order_record(k, res("Encounter", "enc-baby", K, "Encounter/enc-mother"), 0, K_PART)  # partOf the mother's
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    assert set(handed(handover)) == {"Encounter/enc-baby", "Encounter/enc-mother"}
    assert "Encounter/enc-mother" in k.released and "Encounter/enc-baby" not in k.released
    # The mother's next result is released where she is.
    assert len(order_record(k, res("Observation", "obs-m", mother, "Encounter/enc-mother"), 2, K_PART)) == 1


def test_a_later_record_naming_an_earlier_encounter_is_released_in_the_new_partition() -> None:
    pk, pp = {}, {}
    k = partition(K, pk)
    order_record(k, res("Encounter", "enc-1", K), 0, K_PART)
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    # Arriving before the hand-over, it waits for the encounter, which this partition never saw released ...
    assert order_record(p, res("Observation", "obs-9", P, "Encounter/enc-1"), 5, P_PART) == []
    # ... and the hand-over releases it.
    out = take_all(p, pp, handover, P_PART)
    assert refs(out.to_sink) == [("UPDATE", "Observation/obs-9")] and out.redirected == [] == out.handover
    assert p.parked == {} and p.waiting == {}
    # Arriving after it, one is released at once; the encounter's delete waits for both, as in any partition.
    assert len(order_record(p, res("Observation", "obs-10", P, "Encounter/enc-1"), 7, P_PART)) == 1
    assert order_record(p, res("Encounter", "enc-1", P, op="DELETE"), 8, P_PART) == []


def test_a_record_waiting_for_several_handed_over_resources_is_released_once_and_complete() -> None:
    pk, pp = {}, {}
    k = partition(K, pk)
    order_record(k, res("Encounter", "enc-1", K), 0, K_PART)
    order_record(k, res("Observation", "obs-1", K, "Encounter/enc-1"), 0, K_PART)
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    # obs-9 needs the encounter (it waits) and obs-1 (it would otherwise go with a pending reference).
    assert order_record(p, res("Observation", "obs-9", P, "Encounter/enc-1", "Observation/obs-1"), 2, P_PART) == []
    out = take_all(p, pp, handover, P_PART)
    assert refs(out.to_sink) == [("UPDATE", "Observation/obs-9")]
    assert PENDING_REFERENCE_SYSTEM not in out.to_sink[0].resource and p.parked == {}


def test_a_late_or_repeated_hand_over_does_not_bring_back_what_the_new_partition_deleted_since() -> None:
    pk, pp = {}, {}
    k = partition(K, pk)
    order_record(k, res("Encounter", "enc-1", K), 0, K_PART)
    order_record(k, res("Observation", "obs-1", K, "Encounter/enc-1"), 0, K_PART)
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    take_all(p, pp, handover, P_PART)
    # The hospital deletes both (keyed by P now); the hand-over then comes again (a replayed dead letter, or the
    # MOVE's batch processed again after a crash). Deleted stays deleted.
    assert len(order_record(p, res("Observation", "obs-1", P, op="DELETE"), 2, P_PART)) == 1
    assert len(order_record(p, res("Encounter", "enc-1", P, op="DELETE"), 3, P_PART)) == 1
    assert take_all(p, pp, handover, P_PART) == MoveOrder([], [], [])
    assert set(p.released) == {f"Patient/{P}"}
    gone = routed_record(None, resource_type="Patient", source_id="a-1", target_id=P, patient_key=P, op="DELETE")
    assert refs(order_record(p, gone, 5, P_PART)) == [("DELETE", f"Patient/{P}")]


def test_a_newer_version_released_in_the_new_partition_is_kept_over_the_hand_over() -> None:
    pk, pp = {}, {}
    k = partition(K, pk)
    order_record(k, res("Encounter", "enc-2", K), 0, K_PART)
    handover = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    [newer] = order_record(p, res("Encounter", "enc-2", P, "Location/l-1"), 2, P_PART)
    assert handed(handover)["Encounter/enc-2"]["hash"] != newer.content_hash
    take_all(p, pp, handover, P_PART)
    assert p.released["Encounter/enc-2"]["hash"] == newer.content_hash


def test_a_review_undone_gives_the_previous_partition_the_resources_as_they_are_now() -> None:
    pk, pp = {}, {}
    k = partition(K, pk)
    order_record(k, res("Condition", "c-1", K), 0, K_PART)
    order_record(k, res("Observation", "obs-1", K, "Condition/c-1"), 0, K_PART)
    there = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    take_all(p, pp, there, P_PART)
    order_record(p, res("Condition", "c-2", P), 3, P_PART)
    order_record(p, res("Observation", "obs-1", P, "Condition/c-2"), 4, P_PART)  # now names c-2, not c-1
    merge_patient(pk, patient(K))  # a second review sends the patient back to K
    back = order_move(p, pp, move(P, K), 5, P_PART).handover
    take_all(k, pk, back, K_PART)
    assert sorted(k.released["Observation/obs-1"]["deps"]) == ["Condition/c-2", f"Patient/{K}"]
    # The hospital deletes the diagnoses: c-1 goes at once, c-2 waits until obs-1 no longer names it.
    assert refs(order_record(k, res("Condition", "c-1", K, op="DELETE"), 7, K_PART)) == [("DELETE", "Condition/c-1")]
    assert order_record(k, res("Condition", "c-2", K, op="DELETE"), 8, K_PART) == []
    assert set(k.parked) == {"~Observation/obs-1"}


def test_a_hand_over_reaching_a_patient_the_site_moved_on_from_is_handed_on() -> None:
    pk, pp, pq = {}, {}, {}
    k = partition(K, pk)
    order_record(k, res("Encounter", "enc-1", K), 0, K_PART)
    first = order_move(k, pk, move(K, P), 1, K_PART).handover
    p = partition(P, pp)
    order_move(p, pp, move(P, Q), 2, P_PART)  # a second accepted review, processed before the first hand-over
    out = take_all(p, pp, first, P_PART)
    assert out.to_sink == [] and [(r.op, r.target_id, r.patient_key) for r in out.handover] == [(HANDOVER, P, Q)]
    assert handed(out.handover)["Encounter/enc-1"]["deps"] == [f"Patient/{Q}"]
    q = partition(Q, pq)
    assert order_record(q, res("Observation", "obs-9", Q, "Encounter/enc-1"), 4, Q_PART) == []
    assert refs(take_all(q, pq, out.handover, Q_PART).to_sink) == [("UPDATE", "Observation/obs-9")]


def test_the_site_s_records_parked_in_the_previous_partition_follow_to_the_new_one() -> None:
    pk, pp = {}, {}
    k = partition(K, pk, "site-a", "site-b")  # site-b keeps K: the Patient is updated, not deleted
    # obs-1 is written with a pending reference to c-5 (its complete version waits), obs-2 waits for enc-5.
    released = order_record(k, res("Observation", "obs-1", K, "Condition/c-5"), 0, K_PART)
    assert refs(released) == [("UPDATE", "Observation/obs-1")] and PENDING_REFERENCE_SYSTEM in released[0].resource
    assert order_record(k, res("Observation", "obs-2", K, "Encounter/enc-5"), 0, K_PART) == []
    assert order_record(k, res("Observation", "obs-b", K, "Encounter/enc-b", site="site-b"), 0, K_PART) == []

    _, redirected, handover, _ = order_move(k, pk, move(K, P), 1, K_PART)
    assert [(r.target_ref, r.patient_key) for r in redirected] == [("Observation/obs-1", P), ("Observation/obs-2", P)]
    assert set(k.parked) == {"Encounter/enc-b"}  # site-b's stays
    assert expire_parked(k, 10**9, 1000, K_PART)[0].record.site == "site-b"

    # In P's partition: the hand-over, the records sent on, then what they waited for, now keyed by P.
    p = partition(P, pp)
    take_all(p, pp, handover, P_PART)
    sent = [r for record in redirected for r in order_record(p, record, 3, P_PART)]
    assert refs(sent) == [("UPDATE", "Observation/obs-1")]  # again with its pending reference; obs-2 waits
    done = order_record(p, res("Condition", "c-5", P), 4, P_PART)
    done += order_record(p, res("Encounter", "enc-5", P), 5, P_PART)
    assert refs(done) == [
        ("UPDATE", "Condition/c-5"),
        ("UPDATE", "Observation/obs-1"),
        ("UPDATE", "Encounter/enc-5"),
        ("UPDATE", "Observation/obs-2"),
    ]
    assert PENDING_REFERENCE_SYSTEM not in done[1].resource and p.parked == {}


def test_a_move_with_nothing_of_the_site_released_still_hands_over_once_so_what_waits_for_it_goes_on() -> None:
    pk: dict = {}
    state = OrderState({}, {}, {}, {})
    merge_patient(pk, patient(K))
    (only,) = order_move(state, pk, move(K, P), 1, K_PART).handover
    body = orjson.loads(only.resource)
    assert only.patient_key == P and body["released"] == {} and body["positions"] == {} and body["last"] is True


def test_a_large_hand_over_is_split_into_records_of_bounded_size() -> None:
    deps = [f"Observation/component-{n}" for n in range(40)]
    released = {f"Observation/o-{i}": {"hash": "h" * 64, "deps": deps, "site": "site-a"} for i in range(2500)}
    positions = {ref: {"site-a|x": i} for i, ref in enumerate(released)}
    records = handover_records(move(K, P), released, positions)
    assert len(records) > 1 and all(len(encode(r)) < 600 * 1024 for r in records)
    assert [orjson.loads(r.resource)["last"] for r in records] == [False] * (len(records) - 1) + [True]
    assert handed(records) == released
    assert {k: v for r in records for k, v in orjson.loads(r.resource)["positions"].items()} == positions
