"""Per-resource order at the sink: a version waiting in a retry tier or the dead letters holds the later ones."""

from __future__ import annotations

import asyncio
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.blocking import Outcome, Queued, SinkOrder, write_in_order

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

    def arrive(self, item: Queued) -> None:
        route = self.order.route(REF, item.identity)
        if route == "duplicate":
            self.skipped.append(item.identity)
        elif route == "queue":
            self.order.enqueue(REF, item)
        else:
            _run(write_in_order(self.order, REF, item, self._attempt, 0))


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


def test_a_version_read_again_after_a_newer_one_was_written_is_superseded() -> None:
    order = SinkOrder({})
    order.note_written(REF, "site-a|o1", 200)
    assert order.superseded(REF, "site-a|o1", 100)  # re-read after a crash: not written over 200
    assert not order.superseded(REF, "site-a|o1", 200)  # the same version again is harmless
    assert not order.superseded(REF, "site-b|o7", 100)  # another source row's positions are its own
    assert not order.superseded(REF, "site-a|o1", None)
    assert order.route(REF, "ready[0]@9") == "write"  # remembering a position blocks nothing
