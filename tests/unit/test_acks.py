"""Write-back's lanes finish records out of order; Faust commits the first run of acknowledged offsets
wherever it starts (on a partition never committed). InOrderAcks acknowledges a record only when every
record before it in its partition is done, so a commit never passes one still being worked on."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.acks import InOrderAcks

pytestmark = pytest.mark.unit


class _Record:
    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset


def _acks() -> tuple[InOrderAcks[_Record], list[tuple[int, int]]]:
    acked: list[tuple[int, int]] = []

    async def ack(record: _Record) -> None:
        acked.append((record.partition, record.offset))

    return InOrderAcks(lambda r: r.partition, ack), acked


def test_a_record_done_behind_one_still_held_waits_for_it() -> None:
    acks, acked = _acks()
    held, written, other = _Record(0, 0), _Record(0, 1), _Record(1, 0)
    for record in (held, written, other):
        acks.track(record)

    async def run() -> None:
        assert await acks.done(written) == 0  # site-b's copy written while site-a's is held: not acknowledged
        assert await acks.done(other) == 1  # another partition goes on
        assert acks.waiting() == 1
        assert await acks.done(held) == 2  # the held one written (or dead-lettered): both, in order
        assert acks.waiting() == 0

    asyncio.run(run())
    assert acked == [(1, 0), (0, 0), (0, 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_whatever_the_order_records_finish_in_each_partition_is_acknowledged_in_order(
    partitions: list[int], rng: object
) -> None:
    acks, acked = _acks()
    records = []
    for partition in partitions:
        records.append(_Record(partition, sum(1 for r in records if r.partition == partition)))
        acks.track(records[-1])
    finishing = list(records)
    rng.shuffle(finishing)  # type: ignore[attr-defined]

    async def run() -> None:
        finished: set[tuple[int, int]] = set()
        for record in finishing:
            await acks.done(record)
            finished.add((record.partition, record.offset))
            for partition, offset in acked:  # nothing acknowledged ahead of a record not finished
                assert all((partition, earlier) in finished for earlier in range(offset + 1))

    asyncio.run(run())
    for partition in set(partitions):
        offsets = [offset for p, offset in acked if p == partition]
        assert offsets == list(range(partitions.count(partition)))
