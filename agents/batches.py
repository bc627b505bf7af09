"""A stage's input in batches that close as soon as no further record is waiting.

Faust's take_events closes a batch when it holds max_ records or when `within` has passed since the
last batch, so a lone record waits on average half the window at every hop. take_batches closes it at
once when no further record is waiting: none in the stream's queue, and none on the broker beyond what
the batch holds, for every partition of the stream's topics this worker reads (the consumer's high
watermark from its last fetch). Faust hands a fetch's records to the stream one at a time, with the
event loop running in between, so the queue alone is often empty in the middle of a fetch; the high
watermark says the fetch is not over. A quiet pipeline pays no window; under load the batches fill, as
records gather while the previous batch is handled. `within` stays as the longest a partial batch waits.

Whether more is waiting only decides when a batch closes, never what is acknowledged: a wrong guess
costs a smaller batch or one window's wait.

Acknowledgement is take_events': the stream's own acks are off while batches are taken, and every
event of a batch is acknowledged only after the code handling the batch has finished with it, so an
offset is never committed before its record is handled (DESIGN.md invariant 2).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from faust.types import TP, EventT, StreamT
from mode.utils.futures import notify

from pipeline.metrics import STAGE_BATCHES, STAGE_BUSY_SECONDS, STAGE_SECONDS

__all__ = ["more_waiting", "take_batches"]

log = logging.getLogger("cdrsync.batches")
_EXIT_BATCH_BUG = 71  # as the sink's: a bug, not an outage


def more_waiting(stream: StreamT, taken: dict[TP, int]) -> Callable[[], bool]:
    """Whether a record is waiting that the stream has not taken: in its queue, or on the broker past the
    last offset taken (taken: the highest offset taken per partition, kept up to date by the caller).

    A partition read nothing from since it was assigned counts as caught up: its position is unknown here.
    """
    queue = stream.channel.queue
    topics = frozenset(getattr(stream.channel, "topics", ()) or ())  # an in-memory channel has none

    def waiting() -> bool:
        if not queue.empty():
            return True
        if not topics:
            return False
        consumer = stream.app.consumer
        delivered = consumer._read_offset  # type: ignore[attr-defined]  # Faust's last offset handed to streams
        for tp in consumer.assignment():
            if tp.topic not in topics:
                continue
            high = consumer.highwater(tp)
            last = max((o for o in (delivered.get(tp), taken.get(tp)) if o is not None), default=None)
            if high is not None and last is not None and last + 1 < high:
                return True
        return False

    return waiting


async def take_batches(
    stream: StreamT, max_: int, within: float, *, stage: str, close_early: bool = True
) -> AsyncIterator[list[EventT]]:
    """Batches of up to max_ events of the stream, each acknowledged after the caller is done with it.

    A batch closes when it holds max_ events, when within seconds have passed, or (close_early) as soon
    as no further record is waiting (more_waiting). close_early=False is take_events' behaviour.

    Each record's time at the stage goes to cdrsync_stage_seconds{stage}: `wait` from its Kafka timestamp
    to being taken into a batch, `handle` from then until the caller is done with its batch. Each batch
    counts in cdrsync_stage_batches_total, and the time from handing it to the caller until the caller is
    done with it in cdrsync_stage_busy_seconds_total.
    """
    waited, handled_in = STAGE_SECONDS.labels(stage, "wait"), STAGE_SECONDS.labels(stage, "handle")
    batches, busy = STAGE_BATCHES.labels(stage), STAGE_BUSY_SECONDS.labels(stage)
    events: list[EventT] = []
    taken_at: list[float] = []  # when each record of the batch was taken (time.time())
    filled = asyncio.Event()  # the batch is ready to be handled
    drained = asyncio.Event()  # a full batch has been handled: the drainer may add again
    handling: asyncio.Future[None] | None = None  # set while the caller handles a batch
    taken: dict[TP, int] = {}
    waiting = more_waiting(stream, taken) if close_early else None
    acks_before = stream.enable_acks

    async def add(value: Any) -> Any:
        try:
            return await _add(value)
        except asyncio.CancelledError:
            raise
        except Exception:  # the stream would stop and its records wait unhandled: restart instead
            log.critical("taking a record into a batch failed; exiting without acknowledging it", exc_info=True)
            os._exit(_EXIT_BATCH_BUG)

    async def _add(value: Any) -> Any:
        nonlocal handling
        if handling is not None:  # a batch is being handled: this record goes in the next one
            try:
                await handling
            finally:
                handling = None
        event = stream.current_event
        if event is None:
            raise RuntimeError("a record reached the batch without its event")
        events.append(event)
        now = time.time()
        taken_at.append(now)
        if event.message.timestamp:  # the producer's clock: a skewed one reads as no wait, never as a negative one
            waited.observe(max(0.0, now - event.message.timestamp))
        if waiting is not None:
            message = event.message
            taken[message.tp] = max(message.offset, taken.get(message.tp, message.offset))
        if len(events) >= max_:
            filled.set()
            drained.clear()
            await stream.wait(drained)  # never more than max_ in one batch
        elif waiting is not None and not waiting():
            filled.set()
        return value

    stream.enable_acks = False  # acknowledged below, once handled
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # type: ignore[attr-defined]  # drained in the background
    try:
        while not stream.should_stop:
            await stream.wait_for_stopped(filled, timeout=within)  # type: ignore[arg-type]
            if not events:
                continue
            handling = asyncio.get_running_loop().create_future()
            started = time.time()
            try:
                yield list(events)
            finally:
                done = time.time()
                batches.inc()
                busy.inc(max(0.0, done - started))
                for at in taken_at:
                    handled_in.observe(done - at)
                taken_at.clear()
                handled = list(events)
                events.clear()
                for event in handled:
                    await stream.ack(event)
                notify(handling)
                filled.clear()
                drained.set()
    finally:
        stream.enable_acks = acks_before
        stream._processors.remove(add)  # type: ignore[attr-defined]
