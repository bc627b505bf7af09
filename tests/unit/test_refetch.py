"""Records fetched again after a seek back reach the streams, and records handed over during the seek neither
vanish nor read as a gap (agents/app.py GapRefusingConsumer.getmany and perform_seek, KeepingFlowControl).

After a rebalance Faust resumes the stream partitions before it seeks them to their committed offsets, with its
fetcher running. Records fetched in between move its read offset past them; the seek takes the position back,
and Faust's fetch loop dropped the same records, fetched again, as read already: the partition then stood still
with its records unwritten (the fault suite's worker joining during an outage lost whole patients that way).
These tests run Faust's own fetch loop (Consumer._drain_messages) over records a fetch returns.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from mode.utils.queues import FlowControlQueue

from agents.app import GapRefusingConsumer, app

pytestmark = pytest.mark.wiring

READY = TP("fhir.ready.v1-refetch-test", 2)


@pytest.fixture
def consumer() -> Iterator[GapRefusingConsumer]:
    worker_consumer = app.consumer  # built, not started: no broker needed for its fetch loop
    assert isinstance(worker_consumer, GapRefusingConsumer)
    callback = worker_consumer.callback
    yield worker_consumer
    worker_consumer.callback = callback
    for offsets in (worker_consumer._read_offset, worker_consumer._committed_offset):
        for tp in [tp for tp in offsets if "refetch-test" in tp.topic]:
            del offsets[tp]


def _message(offset: int) -> Message:
    return Message(READY.topic, READY.partition, offset, time.time(), 0, [], b"k", b"v", None)


class _Fetcher:
    """What Faust's fetch loop needs of its Fetcher service: a stop flag."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()


async def _handed_over(consumer: GapRefusingConsumer, fetched: list[int], monkeypatch: Any) -> list[int]:
    """Offsets Faust's fetch loop hands to the conductor when one fetch returns `fetched`."""
    fetcher, handed = _Fetcher(), []
    batches = [fetched]

    async def fetch(self: Any, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        if not batches:
            fetcher._stopped.set()  # the loop ends once this fetch's records are through
            return
        for offset in batches.pop(0):
            yield READY, _message(offset)

    async def on_message(message: Message) -> None:
        handed.append(message.offset)

    async def first_of(handing: Any, *others: Any) -> None:  # Service.wait_first, the flow never suspended here
        for other in others:
            other.close()
        await handing

    async def pause(seconds: float) -> None:
        await asyncio.sleep(seconds)

    monkeypatch.setattr(aiokafka_driver.Consumer, "getmany", fetch)  # the fetch under GapRefusingConsumer's
    monkeypatch.setattr(consumer, "wait_first", first_of)  # its events belong to the worker's loop
    monkeypatch.setattr(consumer, "sleep", pause)
    monkeypatch.setattr(app.topics, "acks_enabled_for", lambda topic: True)  # a stream topic: its jumps are gaps
    consumer.callback = on_message
    await asyncio.wait_for(consumer._drain_messages(fetcher), timeout=10)
    return handed


@pytest.mark.asyncio
async def test_records_fetched_again_after_a_seek_back_are_handed_over_again(consumer, monkeypatch) -> None:
    consumer._read_offset[READY] = 1493  # handed over up to 1493 before the seek took the position back to 1437
    handed = await _handed_over(consumer, [1437, 1438, 1439, 1440], monkeypatch)
    assert handed == [1437, 1438, 1439, 1440]
    assert consumer._read_offset[READY] == 1440


@pytest.mark.asyncio
async def test_records_past_the_read_offset_are_handed_over_once_as_before(consumer, monkeypatch) -> None:
    consumer._read_offset[READY] = 1436
    handed = await _handed_over(consumer, [1437, 1438], monkeypatch)
    assert handed == [1437, 1438]
    assert consumer._read_offset[READY] == 1438


@pytest.mark.asyncio
async def test_faust_alone_drops_them(consumer, monkeypatch) -> None:
    """What the override is for: Faust's own getmany under the same fetch hands none of them over."""
    consumer._read_offset[READY] = 1493
    monkeypatch.setattr(
        GapRefusingConsumer, "getmany", lambda self, timeout: aiokafka_driver.Consumer.getmany(self, timeout)
    )
    handed = await _handed_over(consumer, [1437, 1438, 1439, 1440], monkeypatch)
    assert handed == []


def test_resuming_the_flow_keeps_what_the_streams_queues_hold() -> None:
    """Faust resumes the flow once more at the very end of a rebalance, when the queues may already hold records
    of the new assignment: they stay to be handled. A rebalance's start still empties them (suspend, clear), and
    the table changelogs' queue is emptied on resume as Faust's recovery expects."""
    flow = app.flow_control
    stream: FlowControlQueue[int] = app.FlowControlQueue(maxsize=10, clear_on_resume=True)  # as a stream's channel
    changelogs = app.tables.changelog_queue
    flow.suspend()
    stream.put_nowait(1437)
    flow.clear()
    assert stream.empty()  # a rebalance starts: what was queued may be of partitions this worker loses
    stream.put_nowait(1437)
    stream.put_nowait(1438)
    changelogs.put_nowait(7)
    flow.resume()
    assert flow.is_active()
    assert [stream.get_nowait(), stream.get_nowait()] == [1437, 1438]
    assert changelogs.empty()


async def _sought(
    consumer: GapRefusingConsumer, monkeypatch: Any, committed: dict[TP, int | None], faust_only: bool = False
) -> None:
    """The consumer's seek after a rebalance (Faust's own with faust_only), the committed offsets being these."""

    async def seek() -> dict[TP, int | None]:
        return committed

    monkeypatch.setattr(consumer, "seek_to_committed", seek)
    await (aiokafka_driver.Consumer.perform_seek(consumer) if faust_only else consumer.perform_seek())


def _recording_gaps(consumer: GapRefusingConsumer, monkeypatch: Any) -> list[tuple[int, int]]:
    """The gaps Faust's fetch loop reports (offset_from, offset_to), recorded instead of exiting the worker."""
    gaps: list[tuple[int, int]] = []

    async def gap(tp: TP, offset_from: int, offset_to: int) -> None:
        gaps.append((offset_from, offset_to))

    monkeypatch.setattr(consumer, "_add_gap", gap)
    return gaps


async def test_records_handed_over_during_the_seek_are_not_read_as_a_gap(consumer, monkeypatch) -> None:
    """Faust's fetcher runs while it seeks: 1437 to 1453 were handed over from the new position before the seek
    returned. The read offset stays there, so 1454 is the next record, not a jump over 1438..1453."""
    changelog = TP("cdrsync-refetch-test-changelog", 2)
    monkeypatch.setattr(consumer, "_is_changelog_tp", lambda tp: tp.topic.endswith("-changelog"))
    consumer._read_offset[READY] = 1453
    consumer._read_offset[changelog] = 90
    await _sought(consumer, monkeypatch, {READY: 1437, changelog: 40})
    assert consumer._read_offset[READY] == 1453
    assert consumer._committed_offset[READY] == 1437
    assert consumer._read_offset[changelog] == 40  # recovery's partitions: as Faust sets them
    gaps = _recording_gaps(consumer, monkeypatch)
    assert await _handed_over(consumer, [1454, 1455], monkeypatch) == [1454, 1455]
    assert gaps == []


async def test_a_read_offset_behind_the_committed_one_moves_up_to_it(consumer, monkeypatch) -> None:
    """Another worker went further while this one did not hold the partition: reading goes on from there."""
    never = TP("fhir.ready.v1-refetch-test", 4)
    consumer._read_offset[READY] = 1200
    consumer._read_offset[never] = 17
    await _sought(consumer, monkeypatch, {READY: 1437, never: None})
    assert consumer._read_offset[READY] == 1437
    assert consumer._read_offset[never] is None  # never committed: read from the start, as Faust does


async def test_faust_alone_sets_the_read_offset_back_under_them(consumer, monkeypatch) -> None:
    """What the override is for: Faust's own seek leaves 1454 to read as a jump over 1438..1453."""
    consumer._read_offset[READY] = 1453
    await _sought(consumer, monkeypatch, {READY: 1437}, faust_only=True)
    assert consumer._read_offset[READY] == 1437
    gaps = _recording_gaps(consumer, monkeypatch)
    assert await _handed_over(consumer, [1454], monkeypatch) == [1454]
    assert gaps == [(1438, 1454)]  # the worker would exit (GapRefusingConsumer._add_gap) for records it handed over
