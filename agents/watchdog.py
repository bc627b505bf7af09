"""A watchdog for stream partitions Faust stopped delivering.

After a rebalance, Faust's fetcher has been seen to leave a partition with records waiting, none in
processing, and the committed offset standing still: nothing is lost (nothing past it is committed), but
nothing moves either. The watchdog checks every partition this worker consumes: records waiting (the
high-water mark is past the committed offset), no record of its topic unacknowledged (an agent reads all
partitions of a topic in one stream: while the sink waits for a target that is down, holding one record,
the other partitions of its topic wait too, rightly), the committed offset unchanged for
CDRSYNC_STALL_SECONDS: then the worker exits, and its service manager starts it again from the
committed offsets. Never during a rebalance or recovery.

A hole is caught sooner and whatever the rest of its topic does: a partition whose acknowledged records start
past its committed offset (agents/app.py GapRefusingConsumer commits nothing of it then), the consumer past
them, none of the missing ones in processing or waiting in a stream's queue, for HOLE_SECONDS. Faust delivers
a partition's records in order, so those it passed over never come in this worker; records of the topic's
other partitions keep its stream busy, which would keep the stall rule above from ever firing, while the
missing records wait unwritten.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .app import app, settings

log = logging.getLogger("cdrsync.watchdog")
_EXIT_STALLED = 70
_since: dict[Any, tuple[int | None, float]] = {}  # tp → (committed offset, since when it stands still)
_hole_since: dict[Any, tuple[tuple[int, int], float]] = {}  # tp → (hole, since when it is seen)
HOLE_SECONDS = 30.0


def standing_holes(
    holes: Mapping[Any, tuple[int, int]],
    committed: Mapping[Any, int | None],
    delivered: Mapping[Any, int | None],
    assigned: set[Any],
    pending: Iterable[tuple[Any, int]],
    seen: dict[Any, tuple[tuple[int, int], float]],
    now: float,
    after: float = HOLE_SECONDS,
) -> list[tuple[Any, int, int]]:
    """(tp, committed, first acknowledged) of each hole that has stood `after` seconds: the consumer has handed
    its streams records past it (delivered: the last offset handed over per partition) and none of its missing
    offsets is pending (in processing, or waiting in a stream's queue). holes: tp → (committed, first
    acknowledged), from GapRefusingConsumer.holes(); seen is kept by the caller from one call to the next."""
    busy: dict[Any, list[int]] = {}
    for tp, offset in pending:
        busy.setdefault(tp, []).append(offset)
    standing = []
    for tp in list(seen):
        if tp not in holes:
            del seen[tp]
    for tp, hole in holes.items():
        start, first = hole
        current = tp in assigned and committed.get(tp) == start and (delivered.get(tp) or -1) >= first
        if not current or any(start <= offset < first for offset in busy.get(tp, ())):
            seen.pop(tp, None)
            continue
        previous, since = seen.get(tp, (hole, now))
        if previous != hole:
            since = now
        seen[tp] = (hole, since)
        if now - since >= after:
            standing.append((tp, start, first))
    return standing


def _stalled_partitions(now: float) -> list[tuple[Any, int | None, int]]:
    consumer: Any = app.consumer
    busy_topics = {message.tp.topic for message in _in_processing(consumer)}
    stalled = []
    assigned = {tp for tp in consumer.assignment() if not consumer._is_changelog_tp(tp)}  # recovery reads those
    for tp in list(_since):
        if tp not in assigned:
            del _since[tp]
    for tp in assigned:
        committed = consumer._committed_offset.get(tp)
        highwater = consumer.highwater(tp)
        waiting = highwater is not None and highwater > (committed or 0)
        previous, since = _since.get(tp, (None, now))
        if committed != previous or not waiting or tp.topic in busy_topics:
            _since[tp] = (committed, now)
            continue
        _since[tp] = (committed, since)
        if now - since >= settings.stall_seconds:
            stalled.append((tp, committed, highwater))
    return stalled


def _in_processing(consumer: Any) -> list[Any]:
    """The messages a stream has taken and not acknowledged.

    Faust's set of unacknowledged messages keeps one acknowledged below its partition's committed offset (a
    record handled a second time after a seek back): it drops it from the set only on its way to a commit.
    Counted as in processing, such a message kept its whole topic "busy" for as long as anything referenced it,
    and a partition standing still beside it was never restarted."""
    return [message for message in list(consumer._unacked_messages) if not message.acked]


def _standing_holes() -> list[tuple[Any, int, int]]:
    consumer: Any = app.consumer
    try:
        queued = _queued()
    except Exception:  # Faust's internals not as expected: no hole is called standing without knowing
        log.exception("cannot see what waits in the streams' queues; holes are left to the stall rule")
        _hole_since.clear()
        return []
    pending = [(message.tp, message.offset) for message in _in_processing(consumer)] + queued
    return standing_holes(
        consumer.holes(),
        consumer._committed_offset,
        consumer._read_offset,
        set(consumer.assignment()),
        pending,
        _hole_since,
        time.monotonic(),
    )


def _queued() -> list[tuple[Any, int]]:
    """(tp, offset) of every record the consumer has handed to a stream's queue that the stream has not taken."""
    found = []
    index: Any = getattr(app.topics, "_tp_index", {})
    for channels in list(index.values()):
        for channel in list(channels):
            for event in list(getattr(getattr(channel, "queue", None), "_queue", None) or ()):
                message = getattr(event, "message", None)
                if message is not None:
                    found.append((message.tp, message.offset))
    return found


@app.timer(interval=15.0)
async def watch_stream_partitions() -> None:
    """Exit when a partition with waiting records has not moved for stall_seconds (see module doc)."""
    recovery: Any = app.tables.recovery
    if app.rebalancing or not recovery.completed.is_set():
        _since.clear()
        _hole_since.clear()
        return
    holes = _standing_holes()
    if holes:
        for tp, committed, first in holes:
            log.critical(
                "%s[%d]: offsets %d..%d were passed over, later ones acknowledged, for %ds; exiting so a new "
                "worker reads them from the committed offset",
                tp.topic,
                tp.partition,
                committed,
                first - 1,
                HOLE_SECONDS,
            )
        os._exit(_EXIT_STALLED)
    stalled = _stalled_partitions(time.monotonic())
    if stalled:
        for tp, committed, highwater in stalled:
            log.critical(
                "%s[%d] has records up to offset %s but stands at %s, none in processing, for %ds; "
                "exiting so a new worker resumes it from the committed offset",
                tp.topic,
                tp.partition,
                highwater,
                committed,
                settings.stall_seconds,
            )
        os._exit(_EXIT_STALLED)
