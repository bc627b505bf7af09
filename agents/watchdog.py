"""A watchdog for stream partitions Faust stopped delivering.

After a rebalance, Faust's fetcher has been seen to leave a partition with records waiting, none in
processing, and the committed offset standing still: nothing is lost (nothing past it is committed), but
nothing moves either. The watchdog checks every partition this worker consumes: records waiting (the
high-water mark is past the committed offset), no record of its topic unacknowledged (an agent reads all
partitions of a topic in one stream: while the sink waits for a target that is down, holding one record,
the other partitions of its topic wait too, rightly), the committed offset unchanged for
CDRSYNC_STALL_SECONDS: then the worker exits, and its service manager starts it again from the
committed offsets. Never during a rebalance or recovery.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .app import app, settings

log = logging.getLogger("cdrsync.watchdog")
_EXIT_STALLED = 70
_since: dict[Any, tuple[int | None, float]] = {}  # tp → (committed offset, since when it stands still)


def _stalled_partitions(now: float) -> list[tuple[Any, int | None, int]]:
    consumer: Any = app.consumer
    busy_topics = {message.tp.topic for message in list(consumer._unacked_messages)}
    stalled = []
    assigned = {tp for tp in consumer.assignment() if not tp.topic.endswith("-changelog")}
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


@app.timer(interval=15.0)
async def watch_stream_partitions() -> None:
    """Exit when a partition with waiting records has not moved for stall_seconds (see module doc)."""
    recovery: Any = app.tables.recovery
    if app.rebalancing or not recovery.completed.is_set():
        _since.clear()
        return
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
