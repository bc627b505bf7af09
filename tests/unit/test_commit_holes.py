"""The worker never commits past a record that was not acknowledged (agents/app.py GapRefusingConsumer), and
restarts when such records stay missing (agents/watchdog.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message

from agents.app import GapRefusingConsumer, app
from agents.watchdog import _in_processing, standing_holes

pytestmark = pytest.mark.wiring


@pytest.fixture
def consumer() -> Iterator[GapRefusingConsumer]:
    worker_consumer = app.consumer  # built, not started: no broker needed for its bookkeeping
    assert isinstance(worker_consumer, GapRefusingConsumer)
    yield worker_consumer
    for tp in [tp for tp in worker_consumer._acked if tp.topic == "fhir.ready.v1-test"]:
        worker_consumer._acked.pop(tp, None)
        worker_consumer._acked_index.pop(tp, None)
        worker_consumer._committed_offset.pop(tp, None)


def _acked(consumer: GapRefusingConsumer, tp: TP, committed: int, offsets: list[int]) -> None:
    consumer._committed_offset[tp] = committed
    consumer._acked[tp] = list(offsets)
    consumer._acked_index[tp] = set(offsets)


def test_a_record_left_unacknowledged_at_the_committed_offset_is_not_committed_over(consumer, caplog) -> None:
    tp = TP("fhir.ready.v1-test", 5)
    _acked(consumer, tp, committed=3, offsets=[4, 5, 6])
    assert aiokafka_driver.Consumer._new_offset(consumer, tp) == 7  # Faust's own rule: offset 3 would be lost
    _acked(consumer, tp, committed=3, offsets=[4, 5, 6])
    with caplog.at_level(logging.ERROR, logger="cdrsync"):
        assert consumer._new_offset(tp) is None
        assert consumer._new_offset(tp) is None  # still held, reported once
    reports = [r.getMessage() for r in caplog.records if "were not acknowledged" in r.getMessage()]
    assert reports == [
        "fhir.ready.v1-test[5]: offsets 3..3 were not acknowledged but later ones were; not committing past 3 "
        "(the watchdog restarts the worker if they do not come)"
    ]


def test_two_records_missing_hold_the_commit_until_both_are_acknowledged(consumer) -> None:
    tp = TP("fhir.ready.v1-test", 1)
    _acked(consumer, tp, committed=3, offsets=[5, 6, 7])
    assert consumer.holes()[tp] == (3, 5)  # what the watchdog reads
    assert consumer._new_offset(tp) is None
    consumer._acked[tp].append(3)
    consumer._acked_index[tp].add(3)
    assert consumer._new_offset(tp) == 4  # 3 is done; 4 is not
    consumer._committed_offset[tp] = 4  # as the commit of 4 sets it
    assert consumer._new_offset(tp) is None
    consumer._acked[tp].append(4)
    consumer._acked_index[tp].add(4)
    assert consumer._new_offset(tp) == 8
    assert tp not in consumer.holes()


def test_acknowledged_records_from_the_committed_offset_on_are_committed(consumer) -> None:
    tp = TP("fhir.ready.v1-test", 2)
    _acked(consumer, tp, committed=3, offsets=[3, 4, 5, 9])
    assert consumer._new_offset(tp) == 6  # up to the first unacknowledged one, as Faust does


READY5, READY3 = TP("fhir.ready.v1", 5), TP("fhir.ready.v1", 3)
DELIVERED = {READY5: 49, READY3: 219}  # the last offset the consumer handed to the stream


def test_a_hole_standing_with_nothing_of_it_in_processing_restarts_the_worker() -> None:
    seen: dict = {}
    holes, committed = {READY5: (3, 5)}, {READY5: 3, READY3: 219}
    busy_elsewhere = [(READY3, 219), (READY5, 7)]  # the topic's stream stays busy, past the hole too
    both = {READY5, READY3}
    assert standing_holes(holes, committed, DELIVERED, both, busy_elsewhere, seen, now=100.0) == []
    assert standing_holes(holes, committed, DELIVERED, both, busy_elsewhere, seen, now=129.0) == []
    assert standing_holes(holes, committed, DELIVERED, both, busy_elsewhere, seen, now=130.0) == [(READY5, 3, 5)]


def test_a_missing_record_in_processing_is_not_a_hole_yet() -> None:
    seen: dict = {}
    holes, committed = {READY5: (3, 5)}, {READY5: 3}
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [], seen, now=100.0) == []
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [(READY5, 4)], seen, now=140.0) == []
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [], seen, now=150.0) == []  # the wait starts again
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [], seen, now=180.0) == [(READY5, 3, 5)]


def test_a_hole_that_moves_or_is_no_longer_this_workers_starts_over() -> None:
    seen: dict = {}
    assert standing_holes({READY5: (3, 5)}, {READY5: 3}, DELIVERED, {READY5}, [], seen, now=100.0) == []
    assert standing_holes({READY5: (5, 9)}, {READY5: 5}, DELIVERED, {READY5}, [], seen, now=130.0) == []  # another one
    assert standing_holes({READY5: (5, 9)}, {READY5: 5}, DELIVERED, set(), [], seen, now=170.0) == []  # revoked
    assert READY5 not in seen
    committed_since = {READY5: 9}
    assert standing_holes({READY5: (5, 9)}, committed_since, DELIVERED, {READY5}, [], seen, now=200.0) == []
    assert standing_holes({}, {READY5: 9}, DELIVERED, {READY5}, [], seen, now=300.0) == [] and not seen


def test_missing_records_the_consumer_has_not_handed_over_yet_are_not_a_hole() -> None:
    seen: dict = {}
    holes, committed = {READY5: (3, 5)}, {READY5: 3}
    refetching = {READY5: 3}  # sought back to the committed offset: 3 and 4 are on their way
    assert standing_holes(holes, committed, refetching, {READY5}, [], seen, now=100.0) == []
    assert standing_holes(holes, committed, refetching, {READY5}, [], seen, now=200.0) == []
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [], seen, now=210.0) == []
    assert standing_holes(holes, committed, DELIVERED, {READY5}, [], seen, now=240.0) == [(READY5, 3, 5)]


def test_records_waiting_in_a_streams_queue_are_seen_as_pending() -> None:
    """_queued reads Faust's own structures (the conductor's index, a channel's queue): an upgrade that changes
    them fails here rather than leaving the hole rule blind."""
    from faust.events import Event
    from faust.types.tuples import Message

    from agents import watchdog

    channel = app.topic("fhir.ready.v1-queued-test")
    tp = TP("fhir.ready.v1-queued-test", 5)
    message = Message(tp.topic, tp.partition, 4, 0.0, 0, [], b"k", b"v", None, tp=tp)
    channel.queue.put_nowait(Event(app, b"k", b"v", [], message))
    app.topics._tp_index[tp].add(channel)
    try:
        assert (tp, 4) in watchdog._queued()
    finally:
        app.topics._tp_index.pop(tp, None)


def test_a_record_acknowledged_below_the_committed_offset_is_not_in_processing(consumer) -> None:
    """Handled a second time after a seek back, it stays in Faust's unacknowledged set; the stall rule must not
    read its topic as busy for it (agents/watchdog.py _in_processing)."""
    tp = TP("fhir.ready.v1-test", 0)
    consumer._committed_offset[tp] = 1307
    again, waiting = (Message(tp.topic, tp.partition, offset, 0.0, 0, [], b"k", b"v", None) for offset in (1303, 1308))
    for message in (again, waiting):
        consumer._unacked_messages.add(message)
    consumer.ack(again)
    assert again.acked and again in consumer._unacked_messages  # Faust keeps it there
    assert [m for m in _in_processing(consumer) if m.tp == tp] == [waiting]
    consumer.ack(waiting)
    assert [m for m in _in_processing(consumer) if m.tp == tp] == []


def test_a_partition_standing_still_behind_waiting_records_is_stalled_but_a_changelog_is_not(
    consumer, monkeypatch
) -> None:
    """The stall rule (agents/watchdog.py _stalled_partitions): a stream partition whose committed offset stays
    below its high watermark for stall_seconds is reported; a table's changelog partition, read by recovery and
    never committed, is not."""
    from agents import stages, watchdog  # noqa: F401  (stages: the tables, and so their changelogs)

    stream_tp = TP("fhir.ready.v1-test", 2)
    changelog = next(iter(app.tables.changelog_topics))
    changelog_tp = TP(changelog, 2)
    monkeypatch.setitem(consumer._committed_offset, stream_tp, 10)
    monkeypatch.setattr(consumer, "assignment", lambda: {stream_tp, changelog_tp})
    monkeypatch.setattr(consumer, "highwater", lambda tp: 25)
    monkeypatch.setattr(watchdog, "_since", {})
    start = 1000.0
    assert watchdog._stalled_partitions(start) == []  # first seen: the clock starts
    assert watchdog._stalled_partitions(start + watchdog.settings.stall_seconds - 1) == []
    assert watchdog._stalled_partitions(start + watchdog.settings.stall_seconds) == [(stream_tp, 10, 25)]
    monkeypatch.setitem(consumer._committed_offset, stream_tp, 11)  # it moved: the clock starts again
    assert watchdog._stalled_partitions(start + watchdog.settings.stall_seconds + 1) == []


def test_on_a_partition_never_committed_write_back_acks_in_order_so_a_held_record_is_not_committed_over(
    consumer,
) -> None:
    """Faust (and GapRefusingConsumer) take the first run of acknowledged offsets of a partition the group
    never committed wherever it starts: write-back's lanes finish out of order, so they acknowledge through
    InOrderAcks (agents/backflow.py _Lanes), which holds a record's acknowledgement behind an earlier one."""
    import asyncio
    from types import SimpleNamespace

    from pipeline.acks import InOrderAcks

    tp = TP("fhir.ready.v1-test", 7)
    consumer._committed_offset.pop(tp, None)
    consumer._acked[tp], consumer._acked_index[tp] = [], set()
    assert consumer._hole(tp) is None  # no committed offset: nothing to compare with
    consumer._acked[tp], consumer._acked_index[tp] = [1], {1}
    assert consumer._new_offset(tp) == 2  # acknowledged directly: offset 0, still held, would be committed over
    consumer._acked[tp], consumer._acked_index[tp] = [], set()

    async def ack(event: SimpleNamespace) -> None:
        consumer._acked[tp].append(event.offset)
        consumer._acked_index[tp].add(event.offset)

    held, written = SimpleNamespace(tp=tp, offset=0), SimpleNamespace(tp=tp, offset=1)
    acks: InOrderAcks[SimpleNamespace] = InOrderAcks(lambda e: e.tp, ack)
    acks.track(held)
    acks.track(written)

    async def run() -> None:
        await acks.done(written)  # the other hospital's copy is written
        assert consumer._new_offset(tp) is None  # nothing to commit while offset 0 is held
        await acks.done(held)
        assert consumer._new_offset(tp) == 2

    asyncio.run(run())
