"""Per-resource order at the sink: a version waiting in a retry tier or the dead letters holds the later ones."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blocking import Outcome, Queued, SinkOrder, _encode, write_in_order

pytestmark = pytest.mark.unit
REF = "Observation/o1"


def _item(offset: int) -> Queued:
    return Queued(f"ready[0]@{offset}", b"patient", f"v{offset}".encode(), ("ready", 0, offset))


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


class Sink:
    """The sink agent's control flow over SinkOrder, with a scripted target."""

    def __init__(self, fates: list[Outcome]) -> None:
        self.order = SinkOrder({})
        self.fates = deque(fates)
        self.written: list[str] = []
        self.tier: deque[Queued] = deque()
        self.dead: list[Queued] = []
        self.skipped: list[str] = []

    async def _attempt(self, item: Queued, is_head: bool) -> Outcome:
        outcome = self.fates.popleft() if self.fates else "written"
        if outcome == "written":
            self.written.append(item.identity)
        elif outcome == "retrying":
            self.tier.append(item)
        elif outcome == "dead":
            self.dead.append(item)
        return outcome

    def arrive(self, item: Queued, at: str = REF) -> None:
        route = self.order.route(at, item.identity, item.group)
        if route == "duplicate":
            self.skipped.append(item.identity)
        elif route == "queue":
            self.order.enqueue(at, item)
        else:
            _run(write_in_order(self.order, at, item, self._attempt, 0))


def test_a_retry_holds_the_later_versions_and_releases_them_in_order() -> None:
    sink = Sink(["retrying"])
    sink.arrive(_item(1))  # fails: tier
    sink.arrive(_item(2))
    sink.arrive(_item(3))
    assert sink.written == [] and sink.order.blocker(REF) == ("ready[0]@1", "retrying")
    sink.arrive(sink.tier.popleft())  # back from the tier, written, then 2 and 3 behind it
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3"]
    assert sink.order.blocker(REF) is None


def test_a_dead_letter_holds_until_replayed_and_other_resources_pass() -> None:
    sink = Sink(["dead"])
    sink.arrive(_item(1))
    sink.arrive(_item(2))
    other = SinkOrder(sink.order.table)
    assert other.route("Observation/other", "ready[0]@3") == "write"  # another resource is not held
    assert sink.written == [] and sink.order.blocker(REF) == ("ready[0]@1", "dead")
    sink.arrive(sink.dead.pop())  # an operator replays it
    assert sink.written == ["ready[0]@1", "ready[0]@2"]


def test_a_failing_queued_version_becomes_the_head() -> None:
    sink = Sink(["retrying", "written", "retrying"])
    for offset in (1, 2, 3, 4):
        sink.arrive(_item(offset))
    sink.arrive(sink.tier.popleft())  # 1 written, 2 fails and becomes the head; 3, 4 stay queued
    assert sink.written == ["ready[0]@1"]
    assert sink.order.blocker(REF) == ("ready[0]@2", "retrying")
    sink.arrive(sink.tier.popleft())
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3", "ready[0]@4"]


def test_a_stale_copy_of_a_written_retry_is_not_written_again() -> None:
    sink = Sink(["retrying"])
    sink.arrive(_item(1))
    copy = sink.tier[0]
    sink.arrive(sink.tier.popleft())
    sink.arrive(_item(2))
    sink.arrive(copy)  # a crash re-sent the retry: writing it now would put version 1 over version 2
    assert sink.written == ["ready[0]@1", "ready[0]@2"]
    assert sink.skipped == ["ready[0]@1"]


def test_a_discarded_head_releases_the_queue_without_being_written() -> None:
    sink = Sink(["dead"])
    sink.arrive(_item(1))
    sink.arrive(_item(2))
    _run(write_in_order(sink.order, REF, sink.dead.pop(), sink._attempt, 0, skip_head=True))
    assert sink.written == ["ready[0]@2"]


@settings(max_examples=300, deadline=None)
@given(
    versions=st.integers(min_value=1, max_value=8),
    fates=st.lists(st.sampled_from(["written", "written", "retrying", "dead", "conflict"]), max_size=30),
    schedule=st.lists(st.sampled_from(["new", "retry", "replay"]), max_size=40),
)
def test_writes_follow_version_order_and_every_version_gets_through(
    versions: int, fates: list[Outcome], schedule: list[str]
) -> None:
    """Whatever fails, is retried and replayed, in whatever interleaving: the target sees versions in order."""
    sink = Sink(fates)
    pending = deque(_item(offset) for offset in range(1, versions + 1))
    for step in schedule:
        if step == "new" and pending:
            sink.arrive(pending.popleft())
        elif step == "retry" and sink.tier:
            sink.arrive(sink.tier.popleft())
        elif step == "replay" and sink.dead:
            sink.arrive(sink.dead.pop(0))
    while pending or sink.tier or sink.dead:  # drain: new versions, tiers, then every dead letter replayed
        if pending:
            sink.arrive(pending.popleft())
        elif sink.tier:
            sink.arrive(sink.tier.popleft())
        else:
            sink.arrive(sink.dead.pop(0))
    applied = [int(identity.rsplit("@", 1)[1]) for identity in sink.written]
    assert applied == sorted(applied), "a version was written after a later one"
    assert len(applied) == len(set(applied)), "a version was written twice"
    conflicts = versions - len(applied)
    assert 0 <= conflicts <= fates.count("conflict"), "a version vanished without being written or kept"
    assert sink.order.blocker(REF) is None


PROVENANCE = "Provenance/p1"


def _group(offset: int, *refs: str) -> Queued:
    return Queued(f"ready[0]@{offset}", b"patient", b"delete", ("ready", 0, offset), tuple(refs))


def test_a_group_delete_in_a_retry_tier_holds_every_resource_it_deletes() -> None:
    """A delete of an Observation with its Provenance waits in a retry tier; the hospital creates the Observation
    again and its Provenance follows. Both wait behind the delete: written first, the new Provenance would be
    deleted with the old Observation when the delete comes back."""
    sink = Sink(["retrying"])
    delete = _group(1, REF, PROVENANCE)
    sink.arrive(delete)
    sink.arrive(_item(2))  # the Observation created again
    sink.arrive(_item(3), at=PROVENANCE)  # its Provenance
    assert sink.written == []
    assert sink.order.blocker(PROVENANCE) == ("ready[0]@1", "retrying")
    sink.arrive(sink.tier.popleft())
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3"]
    assert sink.order.blocker(REF) is None and sink.order.blocker(PROVENANCE) is None


def test_a_group_waits_behind_an_earlier_version_of_any_resource_it_deletes_and_keeps_their_order() -> None:
    sink = Sink(["retrying"])
    sink.arrive(_item(1), at=PROVENANCE)  # an update of the Provenance fails: tier
    sink.arrive(_group(2, REF, PROVENANCE))  # the group delete must not overtake it
    sink.arrive(_item(3))  # the Observation again: behind the delete, which claimed it
    sink.arrive(_item(4), at=PROVENANCE)
    sink.arrive(_group(2, REF, PROVENANCE))  # a copy of the waiting delete (a crash re-sent it)
    assert sink.written == [] and sink.skipped == ["ready[0]@2"]
    assert sink.order.blocker(REF) == ("ready[0]@2", "queued")
    sink.arrive(sink.tier.popleft(), at=PROVENANCE)
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3", "ready[0]@4"]


def test_a_queued_group_is_written_only_when_its_turn_has_come_at_every_resource() -> None:
    sink = Sink(["retrying", "retrying"])
    sink.arrive(_item(1))  # the Observation's update fails
    sink.arrive(_item(2), at=PROVENANCE)  # and its Provenance's
    sink.arrive(_group(3, REF, PROVENANCE))  # queued at both
    sink.arrive(sink.tier.popleft())  # the Observation's update written: the group still waits for the Provenance
    assert sink.written == ["ready[0]@1"] and sink.order.blocker(REF) == ("ready[0]@3", "queued")
    sink.arrive(sink.tier.popleft(), at=PROVENANCE)
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3"]
    assert sink.order.blocker(REF) is None and sink.order.blocker(PROVENANCE) is None


def test_a_queued_item_written_before_the_change_is_still_read() -> None:
    """A queue entry stored before groups existed (no "group" field) decodes as a single resource."""
    stored = {"identity": "ready[0]@2", "key": "cGF0aWVudA==", "value": "djI=", "origin": ["ready", 0, 2]}
    order = SinkOrder({REF: {"blocker": "ready[0]@1", "state": "retrying", "queue": [stored], "resolved": []}})
    assert order.written(REF, "ready[0]@1") == _item(2)


def _stored(identity: int, queued: list[Queued] | None = None) -> dict:
    """An entry as the code before groups left it: its head in a retry tier."""
    return {"blocker": f"ready[0]@{identity}", "state": "retrying", "queue": [_encode(q) for q in queued or []]}


def test_a_group_held_at_its_own_resource_alone_by_the_code_before_waits_for_the_others_when_it_returns() -> None:
    """Left by the code before groups: the delete (Observation with Provenance) held only the Observation, and an
    update of the Provenance waits in a tier with a later one queued. Back from its tier, the delete must not
    release or take over the Provenance's queue while that update is still out."""
    sink = Sink([])
    # read in this order: the update @1, the delete @2, a later version @3 (queued behind @1 alone, then)
    sink.order.table.update({REF: _stored(2), PROVENANCE: _stored(1, [_item(3)])})
    delete = _group(2, REF, PROVENANCE)
    sink.arrive(delete)
    assert sink.written == [] and sink.order.blocker(REF) == ("ready[0]@2", "queued")
    assert sink.order.blocker(PROVENANCE) == ("ready[0]@1", "retrying")
    sink.arrive(delete)  # a copy of it
    assert sink.skipped == ["ready[0]@2"]
    sink.arrive(_item(1), at=PROVENANCE)  # the update back from its tier
    assert sink.written == ["ready[0]@1", "ready[0]@2", "ready[0]@3"]  # in the order they were read
    assert sink.order.blocker(REF) is None and sink.order.blocker(PROVENANCE) is None


def test_a_failing_group_does_not_take_over_a_resource_another_version_holds() -> None:
    order = SinkOrder({REF: {"blocker": "ready[0]@1", "state": "retrying"}, PROVENANCE: _stored(2)})

    async def fails(item: Queued, is_head: bool) -> Outcome:
        return "retrying"

    _run(write_in_order(order, REF, _group(1, REF, PROVENANCE), fails, 0))
    assert order.blocker(PROVENANCE) == ("ready[0]@2", "retrying")  # still the update's, not the delete's


RESOURCES = ("Observation/o1", "Provenance/p1", "Encounter/e1")


@settings(max_examples=400, deadline=None)
@given(
    writes=st.lists(st.lists(st.sampled_from(RESOURCES), min_size=1, max_size=3, unique=True), min_size=1, max_size=8),
    fates=st.lists(st.sampled_from(["written", "written", "retrying", "dead", "conflict"]), max_size=30),
    schedule=st.lists(st.sampled_from(["new", "retry", "replay"]), max_size=40),
)
def test_every_resource_sees_its_versions_in_order_with_groups(
    writes: list[list[str]], fates: list[Outcome], schedule: list[str]
) -> None:
    """Versions of three resources, some written alone, some deleted together: whatever fails, is retried and
    replayed, each resource sees the writes that touch it in arrival order, each once, and nothing stays held."""
    sink = Sink(fates)
    items = [(refs[0], _group(n, *refs) if len(refs) > 1 else _item(n)) for n, refs in enumerate(writes, start=1)]
    touches = {n: refs for n, refs in enumerate(writes, start=1)}
    pending = deque(items)
    at_of = {item.identity: at for at, item in items}

    def again(item: Queued) -> None:
        sink.arrive(item, at=at_of[item.identity])

    for step in schedule:
        if step == "new" and pending:
            sink.arrive(pending[0][1], at=pending.popleft()[0])
        elif step == "retry" and sink.tier:
            again(sink.tier.popleft())
        elif step == "replay" and sink.dead:
            again(sink.dead.pop(0))
    while pending or sink.tier or sink.dead:
        if pending:
            sink.arrive(pending[0][1], at=pending.popleft()[0])
        elif sink.tier:
            again(sink.tier.popleft())
        else:
            again(sink.dead.pop(0))
    applied = [int(identity.rsplit("@", 1)[1]) for identity in sink.written]
    assert len(applied) == len(set(applied)), "a version was written twice"
    for ref in RESOURCES:
        seen = [n for n in applied if ref in touches[n]]
        assert seen == sorted(seen), f"{ref}: a version was written after a later one"
        assert sink.order.blocker(ref) is None, f"{ref} is still held"
    assert 0 <= len(writes) - len(applied) <= fates.count("conflict"), "a version vanished"


def test_a_version_read_again_after_a_newer_one_was_written_is_superseded() -> None:
    order = SinkOrder({})
    order.note_written(REF, "site-a|o1", 200)
    assert order.superseded(REF, "site-a|o1", 100)  # re-read after a crash: not written over 200
    assert not order.superseded(REF, "site-a|o1", 200)  # the same version again is harmless
    assert not order.superseded(REF, "site-b|o7", 100)  # another source row's positions are its own
    assert not order.superseded(REF, "site-a|o1", None)
    assert order.route(REF, "ready[0]@9") == "write"  # remembering a position blocks nothing
