"""The new Patient's partition waits for the previous one's hand-over (pipeline/patientmove.py `handover_notice`,
`hold_for_handover`, `take_over`).

When a reviewer accepts that a hospital's patient is the person of Patient P, not K, the identity stage sends the
MOVE to K's partition of the order stage and the hospital's records from then on to P's. K's partition may lag
far behind (a back-load): the hospital's delete of an observation, made after the decision, can reach P's
partition before K's has even released the observation's create. The identity stage therefore sends P's partition
a notice first; P holds the site's records until K's hand-over comes, then releases them in their order, each
delete of a resource K released carrying the position the target must hold before it is deleted. Each test runs
one OrderState per partition, the records passing through Avro as on the topics.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from pipeline.merge import merge_patient
from pipeline.ordering import OrderState, expire_parked, order_record
from pipeline.patientmove import (
    MOVE,
    MoveOrder,
    barrier_of,
    handover_notice,
    handover_records,
    hold_for_handover,
    is_handover,
    lift_expired_barrier,
    order_move,
    redirect,
    take_over,
)
from pipeline.records import RoutedResource, decode, encode
from tests.casebuilder import move_of
from tests.casebuilder import patient_resource as res
from tests.casebuilder import patient_version as patient

pytestmark = pytest.mark.unit

K, P, Q = "k0000000-0000-5000-8000-000000000000", "p0000000-0000-5000-8000-000000000000", "q0" + "0" * 34
HOUR_MS = 3_600_000


class Partition:
    """One partition of the order stage, taking records as agents/stages.py `_order_one` does."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.state = OrderState({}, {}, {}, {})
        self.patients: dict[str, Any] = {}

    def take(self, record: RoutedResource, now_ms: int = 0) -> MoveOrder:
        record = decode(encode(record), RoutedResource)  # through the topic
        if is_handover(record):
            return take_over(self.state, self.patients, record, now_ms, self.number)
        if record.op == MOVE:
            return order_move(self.state, self.patients, record, now_ms, self.number)
        if (elsewhere := redirect(self.patients, record)) is not None:
            return MoveOrder([], [elsewhere], [])
        if hold_for_handover(self.state, self.patients, record, now_ms, self.number, HOUR_MS):
            return MoveOrder([], [], [])
        return MoveOrder(order_record(self.state, merge_patient(self.patients, record), now_ms, self.number), [], [])

    def take_all(self, records: list[RoutedResource], now_ms: int = 0) -> MoveOrder:
        out = MoveOrder([], [], [])
        for record in records:
            step = self.take(record, now_ms)
            out = MoveOrder(out.to_sink + step.to_sink, out.redirected + step.redirected, out.handover + step.handover)
        return out


def refs(records: list[RoutedResource]) -> list[tuple[str, str]]:
    return [(r.op, r.target_ref) for r in records]


def test_a_delete_sent_after_the_decision_waits_for_the_create_the_lagging_previous_partition_still_holds() -> None:
    k, p = Partition(0), Partition(4)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    create = res("Observation", "obs-1", K, "Encounter/enc-1")  # sent before the review; K has not taken it yet
    move = move_of(K, P)
    # The decision: the notice and the accepted Patient go to P, the MOVE to K; then the hospital deletes obs-1.
    # The Patient goes on (the MOVE at K's sink waits for it to hold the site's patient); the rest waits.
    assert refs(p.take_all([handover_notice(move), patient(P)]).to_sink) == [("UPDATE", f"Patient/{P}")]
    delete = res("Observation", "obs-1", P, op="DELETE")
    later = res("Observation", "obs-2", P, "Encounter/enc-1")
    assert p.take_all([delete, later]) == MoveOrder([], [], [])  # held: K's hand-over has not come
    assert set(p.state.parked) == {barrier_of("site-a", P)}
    # K catches up: the create is released there, then the MOVE hands over what K released of the site.
    assert refs(k.take(create).to_sink) == [("UPDATE", "Observation/obs-1")]
    handover = k.take(move).handover
    out = p.take_all(handover)
    assert refs(out.to_sink) == [("DELETE", "Observation/obs-1"), ("UPDATE", "Observation/obs-2")]
    assert p.state.parked == {} and p.state.waiting == {}
    # The delete names the create's position: the sink deletes only once the target holds it.
    assert out.to_sink[0].awaits_lsn == create.source_lsn and out.to_sink[1].awaits_lsn is None
    assert "awaiting" not in p.patients[P]
    # From now on the site's records at P go straight on.
    assert len(p.take(res("Observation", "obs-3", P, "Encounter/enc-1")).to_sink) == 1


def test_only_the_moving_site_s_records_wait_other_hospitals_go_on() -> None:
    p = Partition(4)
    p.take_all([patient(P, "site-b", "b-1"), handover_notice(move_of(K, P))])
    assert len(p.take(res("Observation", "obs-b", P, site="site-b")).to_sink) == 1
    assert p.take(res("Observation", "obs-a", P)) == MoveOrder([], [], [])


def test_a_hand_over_that_comes_before_its_notice_does_not_leave_the_site_waiting() -> None:
    """Kafka orders records per partition only: the MOVE, sent after the notice to another partition, may be
    taken there and its hand-over reach P before the notice does."""
    k, p = Partition(0), Partition(4)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    move = move_of(K, P)
    p.take_all(k.take(move).handover)
    p.take_all([handover_notice(move), patient(P)])
    assert [r.target_ref for r in p.take(res("Observation", "obs-1", P, "Encounter/enc-1")).to_sink] == [
        "Observation/obs-1"
    ]


def test_the_wait_ends_only_with_the_last_record_of_a_hand_over_in_several() -> None:
    p = Partition(4)
    move = move_of(K, P)
    p.take_all([handover_notice(move), patient(P), res("Observation", "obs-1", P)])
    released = {
        f"Observation/o-{i}": {"hash": "h" * 64, "deps": [f"Patient/{P}"] * 200, "site": "site-a"} for i in range(900)
    }
    parts = handover_records(move, released, {})
    assert len(parts) > 1
    for part in parts[:-1]:
        assert p.take(part).to_sink == []
    assert refs(p.take(parts[-1]).to_sink) == [("UPDATE", "Observation/obs-1")]


def test_along_a_chain_of_moves_the_last_patient_waits_for_every_hand_over_before_it() -> None:
    """K → P, then P → Q before K's hand-over came: Q waits for P's and for K's (handed on by P)."""
    k, p, q = Partition(0), Partition(4), Partition(5)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    create = res("Observation", "obs-1", K, "Encounter/enc-1")
    first, second = move_of(K, P), move_of(P, Q, decided_ms=1_700_000_100_000)
    p.take_all([handover_notice(first), patient(P)])
    q.take_all([handover_notice(second), patient(Q)])
    delete = res("Observation", "obs-1", Q, op="DELETE")
    assert q.take(delete) == MoveOrder([], [], [])
    from_p = p.take(second)  # P hands over (nothing of its own) and what it still waits for
    assert q.take_all(from_p.handover + from_p.redirected).to_sink == []  # still waiting for K's
    k.take(create)
    from_k = p.take_all(k.take(first).handover)  # reaches P, which the site left: handed on to Q
    assert from_k.to_sink == [] and from_k.handover
    out = q.take_all(from_k.handover)
    assert refs(out.to_sink) == [("DELETE", "Observation/obs-1")]
    assert out.to_sink[0].awaits_lsn == create.source_lsn
    assert q.state.parked == {} and "awaiting" not in q.patients[Q]


def test_a_delete_of_resources_that_reference_each_other_waits_for_each_of_them() -> None:
    """Two observations naming each other are deleted in one transaction (`delete_with`). K released both before
    the move, its sink lagging: the group delete names the change the target must hold for each of them."""
    k, p = Partition(0), Partition(4)
    k.take_all([patient(K)])
    first = res("Observation", "obs-a", K, "Observation/obs-b")
    second = res("Observation", "obs-b", K, "Observation/obs-a")
    assert [r.target_ref for r in k.take_all([first, second]).to_sink] == [
        "Observation/obs-a",  # with its reference to obs-b pending
        "Observation/obs-b",
        "Observation/obs-a",  # completed
    ]
    move = move_of(K, P)
    p.take_all([handover_notice(move), patient(P)])
    deletes = [res("Observation", "obs-a", P, op="DELETE"), res("Observation", "obs-b", P, op="DELETE")]
    assert p.take_all(deletes).to_sink == []  # held for the hand-over
    out = p.take_all(k.take(move).handover)
    assert len(out.to_sink) == 1
    (delete,) = out.to_sink
    assert (delete.target_ref, delete.delete_with) == ("Observation/obs-b", ["Observation/obs-a"])
    assert delete.awaits_lsn == second.source_lsn
    assert delete.awaits_with == [{"ref": "Observation/obs-a", "row": "site-a|obs-a", "lsn": first.source_lsn}]
    # One released at P itself since the move is not waited for: its partition's sink writes it before.
    p.take(res("Observation", "obs-c", P))
    p.take(res("Observation", "obs-d", P, "Observation/obs-c"))
    p.take(res("Observation", "obs-c", P, "Observation/obs-d"))
    p.take(res("Observation", "obs-c", P, op="DELETE"))
    (own,) = p.take(res("Observation", "obs-d", P, op="DELETE")).to_sink
    assert own.delete_with and own.awaits_lsn is None and own.awaits_with == []


def test_records_that_waited_longer_than_the_park_limit_become_dead_letters_naming_the_hand_over() -> None:
    p = Partition(4)
    p.take_all([patient(P, "site-b", "b-1"), handover_notice(move_of(K, P))], now_ms=0)
    p.take(patient(P), now_ms=5)
    p.take(res("Observation", "obs-1", P), now_ms=10)
    assert expire_parked(p.state, HOUR_MS, HOUR_MS, p.number) == []
    expired = expire_parked(p.state, HOUR_MS + 10, HOUR_MS, p.number)
    assert [(e.record.target_ref, e.missing) for e in expired] == [("Observation/obs-1", barrier_of("site-a", P))]
    reason = lift_expired_barrier(p.patients, expired[0].missing, HOUR_MS + 10, HOUR_MS)
    assert reason is not None and f"central|{K}@" in reason and f"Patient/{P}" in reason
    assert lift_expired_barrier(p.patients, "Encounter/enc-1", HOUR_MS + 10, HOUR_MS) is None
    # The site's next record goes on (the dead letters can be replayed once the MOVE is seen to).
    assert len(p.take(res("Observation", "obs-2", P), now_ms=HOUR_MS + 20).to_sink) == 1


def test_a_wait_older_than_the_park_limit_with_nothing_held_is_given_up_for_the_next_record() -> None:
    p = Partition(4)
    p.take_all([patient(P, "site-b", "b-1"), handover_notice(move_of(K, P))], now_ms=0)
    assert p.take(res("Observation", "obs-1", P), now_ms=HOUR_MS - 1).to_sink == []  # still within the limit
    expire_parked(p.state, 2 * HOUR_MS, HOUR_MS, p.number)  # (what waited expired; the tick lifts the wait) ...
    p.patients[P] = {**p.patients[P], "awaiting": {"site-a": {f"central|{K}@1": {"since": 0, "came": False}}}}
    assert len(p.take(res("Observation", "obs-2", P), now_ms=2 * HOUR_MS).to_sink) == 1
    assert "awaiting" not in p.patients[P]


def test_the_wait_survives_another_hospital_s_patient_version_and_a_move_carries_it_on() -> None:
    p = Partition(4)
    p.take_all([patient(P, "site-b", "b-1"), handover_notice(move_of(K, P))])
    p.take(patient(P, "site-b", "b-1"))  # merge_patient rewrites the entry
    assert set(p.patients[P]["awaiting"]) == {"site-a"}
    body = orjson.loads(p.take(move_of(P, Q)).handover[-1].resource)
    assert list(body["awaiting"]) == [f"central|{K}@1700000000000"] and "awaiting" not in p.patients[P]


def test_the_accepted_patient_is_written_even_if_the_patient_moves_on_before_the_hand_over_comes() -> None:
    """K → P, then P → Q while K lags: P held the site's patient (the MOVE K→P at K's sink looks for that, and
    then follows her to Q); its MOVE to Q takes the site out of P again."""
    p = Partition(4)
    assert refs(p.take_all([handover_notice(move_of(K, P)), patient(P)]).to_sink) == [("UPDATE", f"Patient/{P}")]
    assert "site-a" in p.patients[P]["sites"]
    out = p.take(move_of(P, Q, decided_ms=1_700_000_100_000))
    assert refs(out.to_sink)[:2] == [("MOVE", f"Patient/{P}"), ("DELETE", f"Patient/{P}")]


def test_a_wait_that_expires_ends_only_for_the_hand_over_awaited_longest() -> None:
    p = Partition(4)
    p.take_all([patient(P, "site-b", "b-1"), handover_notice(move_of(K, P))], now_ms=0)
    p.take(res("Observation", "obs-1", P), now_ms=10)
    p.take(handover_notice(move_of(Q, P, decided_ms=1_700_000_100_000)), now_ms=HOUR_MS - 5)  # a later review
    [expired] = expire_parked(p.state, HOUR_MS + 10, HOUR_MS, p.number)
    reason = lift_expired_barrier(p.patients, expired.missing, HOUR_MS + 10, HOUR_MS)
    assert reason is not None and f"central|{K}@" in reason and f"central|{Q}@" not in reason
    assert p.take(res("Observation", "obs-2", P), now_ms=HOUR_MS + 20).to_sink == []  # Q's is still awaited


def test_a_hand_over_from_a_worker_that_does_not_name_its_move_ends_the_wait_for_its_patient() -> None:
    k, p = Partition(0), Partition(4)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    move = move_of(K, P)
    p.take_all([handover_notice(move), patient(P), res("Observation", "obs-1", P, "Encounter/enc-1")])
    older = []
    for record in k.take(move).handover:  # as a worker before the notice existed wrote it
        body = {key: v for key, v in orjson.loads(record.resource).items() if key not in ("move", "last")}
        older.append(replace(record, resource=orjson.dumps(body).decode()))
    assert refs(p.take_all(older).to_sink) == [("UPDATE", "Observation/obs-1")]


def test_a_notice_sent_again_after_its_hand_over_came_holds_nothing_back() -> None:
    """A replayed dead letter, or a batch of the identity stage processed again after a crash."""
    k, p = Partition(0), Partition(4)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    move = move_of(K, P)
    p.take_all([handover_notice(move), patient(P)])
    p.take_all(k.take(move).handover)
    p.take(handover_notice(move))
    assert refs(p.take(res("Observation", "obs-1", P, "Encounter/enc-1")).to_sink) == [("UPDATE", "Observation/obs-1")]
    # and one that comes twice before its hand-over waits once, from the first
    q = Partition(5)
    q.take(handover_notice(move_of(P, Q)), now_ms=0)
    q.take(handover_notice(move_of(P, Q)), now_ms=HOUR_MS - 1)
    assert q.patients[Q]["awaiting"]["site-a"][f"central|{P}@1700000000000"]["since"] == 0


def test_a_notice_sent_again_after_the_patient_moved_on_does_not_bring_her_records_back() -> None:
    """K → P, then P → Q; the K → P notice comes again: the site's records still on their way to P go on to Q."""
    k, p = Partition(0), Partition(4)
    k.take(patient(K))
    first = move_of(K, P)
    p.take_all([handover_notice(first), patient(P)])
    p.take_all(k.take(first).handover)
    p.take(move_of(P, Q, decided_ms=1_700_000_100_000))
    p.take(handover_notice(first))
    late = res("Observation", "obs-1", P)  # e.g. sent on by P's sink from a retry tier
    assert [r.patient_key for r in p.take(late).redirected] == [Q]


def test_a_notice_sent_again_after_the_patient_moved_on_before_the_hand_over_came_changes_nothing() -> None:
    """K → P, then P → Q before K's hand-over came (Q waits for it, handed on by P); the K → P notice comes again
    at P: K's hand-over still goes on to Q, and what waited there for it is released."""
    k, p, q = Partition(0), Partition(4), Partition(5)
    k.take_all([patient(K), res("Encounter", "enc-1", K)])
    first, second = move_of(K, P), move_of(P, Q, decided_ms=1_700_000_100_000)
    p.take_all([handover_notice(first), patient(P)])
    q.take_all([handover_notice(second), patient(Q), res("Observation", "obs-9", Q, "Encounter/enc-1")])
    q.take_all(p.take(second).handover)
    p.take(handover_notice(first))
    onward = p.take_all(k.take(first).handover)
    assert onward.to_sink == [] and onward.handover
    assert refs(q.take_all(onward.handover).to_sink) == [("UPDATE", "Observation/obs-9")]
