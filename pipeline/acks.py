"""Acknowledging records in their partition's order when they finish out of order.

Faust commits a partition up to the first run of consecutive acknowledged offsets, and on a partition the
group never committed (or committed at 0) it takes that run wherever it starts: with offset 0 still being
worked on and offset 1 acknowledged, it commits 2, and a restart never reads 0 again. A consumer that
finishes records out of order (write-back's lanes, one per hospital: one hospital held, another written)
must therefore acknowledge a record only once every record before it in its partition is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["InOrderAcks"]

Event = TypeVar("Event")


@dataclass
class _Entry(Generic[Event]):
    event: Event
    done: bool = False


class InOrderAcks(Generic[Event]):
    """Tracks records in the order read, per partition; acknowledges each when it and all before it are done.

    `partition_of` names a record's partition, `ack` acknowledges it. Call `track` for every record as it is
    read, then `done` once it is finished with (written, dead-lettered, or dropped on purpose).
    """

    def __init__(self, partition_of: Callable[[Event], Hashable], ack: Callable[[Event], Awaitable[object]]) -> None:
        self._partition_of = partition_of
        self._ack = ack
        self._pending: dict[Hashable, deque[_Entry[Event]]] = {}  # partition → its records in read order
        self._entry: dict[int, _Entry[Event]] = {}  # id(record) → its entry

    def track(self, event: Event) -> None:
        """Record that `event` was read (before any later record of its partition)."""
        entry = _Entry(event)
        self._pending.setdefault(self._partition_of(event), deque()).append(entry)
        self._entry[id(event)] = entry

    async def done(self, event: Event) -> int:
        """`event` is finished with: acknowledge it and what follows it that is done too, unless an earlier
        record of its partition is not done yet. Returns how many records were acknowledged."""
        self._entry.pop(id(event)).done = True
        queue = self._pending[self._partition_of(event)]
        acked = 0
        while queue and queue[0].done:
            await self._ack(queue.popleft().event)
            acked += 1
        return acked

    def waiting(self) -> int:
        """Records done but not acknowledged, behind one that is not done."""
        return sum(1 for queue in self._pending.values() for entry in queue if entry.done)
