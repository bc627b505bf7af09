"""A stage's input in batches that close as soon as no further record is waiting.

Faust's take_events closes a batch when it holds max_ records or when `within` has passed since the
last batch, so a lone record waits on average half the window at every hop. take_batches closes it at
once when the stream's queue holds nothing more: a quiet pipeline pays no window, and under load the
batches still fill, because records gather in the queue while the previous batch is handled. `within`
stays as the longest a partial batch waits, as in take_events.

Acknowledgement is take_events': the stream's own acks are off while batches are taken, and every
event of a batch is acknowledged only after the code handling the batch has finished with it, so an
offset is never committed before its record is handled (DESIGN.md invariant 2).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from faust.types import EventT, StreamT
from mode.utils.futures import notify

__all__ = ["take_batches"]


async def take_batches(
    stream: StreamT, max_: int, within: float, *, close_early: bool = True
) -> AsyncIterator[list[EventT]]:
    """Batches of up to max_ events of the stream, each acknowledged after the caller is done with it.

    A batch closes when it holds max_ events, when within seconds have passed, or (close_early) as soon
    as the stream's queue holds no further record. close_early=False is take_events' behaviour.
    """
    events: list[EventT] = []
    filled = asyncio.Event()  # the batch is ready to be handled
    drained = asyncio.Event()  # a full batch has been handled: the drainer may add again
    handling: asyncio.Future[None] | None = None  # set while the caller handles a batch
    queue = stream.channel.queue if close_early else None
    acks_before = stream.enable_acks

    async def add(value: Any) -> Any:
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
        if len(events) >= max_:
            filled.set()
            drained.clear()
            await stream.wait(drained)  # never more than max_ in one batch
        elif queue is not None and queue.empty():
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
            try:
                yield list(events)
            finally:
                taken = list(events)
                events.clear()
                for event in taken:
                    await stream.ack(event)
                notify(handling)
                filled.clear()
                drained.set()
    finally:
        stream.enable_acks = acks_before
        stream._processors.remove(add)  # type: ignore[attr-defined]
