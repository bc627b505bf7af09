"""A stage's batches (agents/batches.py take_batches): a lone record is handled without waiting out the
batch window, a burst is still taken together, never more than the batch's size, no record is
acknowledged before the code handling its batch is done with it, and each record's time at the stage is
measured (cdrsync_stage_seconds).

Each test runs a Faust agent on an in-memory channel (Faust's test_context): no broker is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import faust
import pytest
from prometheus_client import REGISTRY

from agents.batches import take_batches

pytestmark = pytest.mark.wiring

_WINDOW = 600.0  # a batch window far longer than any test waits


class Taken:
    """What one agent took: the values of each batch, and whether its records were acknowledged while the
    batch was being handled and once it had been."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.acked_while_handled: list[bool] = []
        self.events: list[Any] = []
        self.arrived = asyncio.Condition()

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        """Until `count` records were taken, or the timeout passed."""

        async def enough() -> None:
            async with self.arrived:
                await self.arrived.wait_for(lambda: sum(map(len, self.batches)) >= count)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(enough(), timeout)


def _agent(max_: int, close_early: bool, stage: str = "test", handling: float = 0.0) -> tuple[Any, Taken]:
    app = faust.App(f"cdrsync-test-batches-{max_}-{close_early}", broker="kafka://localhost:1", store="memory://")
    taken = Taken()

    @app.agent()
    async def take(stream: faust.StreamT[Any]) -> None:
        async for events in take_batches(stream, max_, _WINDOW, close_early=close_early, stage=stage):
            taken.acked_while_handled.append(any(event.message.acked for event in events))
            await asyncio.sleep(handling)  # the handler gives way, as every real one does
            taken.events += events
            async with taken.arrived:
                taken.batches.append([event.value for event in events])
                taken.arrived.notify_all()

    return take, taken


def test_a_lone_record_is_handled_without_waiting_out_the_window() -> None:
    async def run() -> Taken:
        agent, taken = _agent(max_=100, close_early=True)
        async with agent.test_context() as context:
            for n in range(3):  # one at a time, each after the previous one was handled
                await context.put(n, wait=False)
                await taken.wait_for(n + 1)
        return taken

    taken = asyncio.run(run())
    assert taken.batches == [[0], [1], [2]]


def test_without_closing_early_a_lone_record_waits_for_the_window() -> None:
    async def run() -> list[list[Any]]:
        agent, taken = _agent(max_=100, close_early=False)
        async with agent.test_context() as context:
            await context.put(0, wait=False)
            await taken.wait_for(1, timeout=2.0)
            return list(taken.batches)  # before the agent stops, which ends the window

    assert asyncio.run(run()) == []  # still waiting: the window is ten minutes


def test_a_burst_is_taken_in_full_batches_of_at_most_max() -> None:
    async def run() -> Taken:
        agent, taken = _agent(max_=4, close_early=True)
        async with agent.test_context() as context:
            for n in range(10):  # all waiting before the agent takes any
                await context.put(n, wait=False)
            await taken.wait_for(10)
        return taken

    taken = asyncio.run(run())
    assert [value for batch in taken.batches for value in batch] == list(range(10))  # all, in order, once
    assert all(len(batch) <= 4 for batch in taken.batches)
    assert len(taken.batches[0]) == 4  # waiting records fill the batch


def test_records_are_acknowledged_only_after_their_batch_was_handled() -> None:
    async def run() -> Taken:
        agent, taken = _agent(max_=3, close_early=True)
        async with agent.test_context() as context:
            for n in range(7):
                await context.put(n, wait=False)
            await taken.wait_for(7)
            await asyncio.sleep(0.1)  # the last batch's acknowledgement follows its handling
        return taken

    taken = asyncio.run(run())
    assert sum(map(len, taken.batches)) == 7
    assert taken.acked_while_handled == [False] * len(taken.batches)
    assert all(event.message.acked for event in taken.events)


def _stage_seconds(stage: str, part: str) -> tuple[float, float]:
    """(count, sum) of cdrsync_stage_seconds for one stage and part."""
    labels = {"stage": stage, "part": part}
    count = REGISTRY.get_sample_value("cdrsync_stage_seconds_count", labels) or 0.0
    return count, REGISTRY.get_sample_value("cdrsync_stage_seconds_sum", labels) or 0.0


def test_each_record_s_wait_and_handling_at_the_stage_are_measured() -> None:
    stage = "test-measured"

    async def run() -> Taken:
        agent, taken = _agent(max_=100, close_early=True, stage=stage, handling=0.3)
        async with agent.test_context() as context:
            for n in range(3):  # produced 5 s ago: each waited at least that long before the stage took it
                await context.put(n, timestamp=time.time() - 5.0, wait=False)
                await taken.wait_for(n + 1)
            await context.put(3, timestamp=time.time() + 100.0, wait=False)  # a producer whose clock is ahead
            await taken.wait_for(4)
            await asyncio.sleep(0.1)  # the last batch's measurement follows its handling
        return taken

    taken = asyncio.run(run())
    assert sum(map(len, taken.batches)) == 4
    waits, waited = _stage_seconds(stage, "wait")
    assert waits == 4
    assert 15.0 <= waited < 20.0  # 3 x 5 s, and the record from a clock ahead counts as no wait, not as -100 s
    handles, handled = _stage_seconds(stage, "handle")
    assert handles == 4
    assert handled >= 4 * 0.3  # each record's batch took 0.3 s to handle after it was taken


def test_a_stage_s_batches_and_its_busy_time_are_counted() -> None:
    stage = "test-busy"

    async def run() -> tuple[Taken, float]:
        agent, taken = _agent(max_=3, close_early=True, stage=stage, handling=0.2)
        started = time.monotonic()
        async with agent.test_context() as context:
            for n in range(7):
                await context.put(n, wait=False)
            await taken.wait_for(7)
            await asyncio.sleep(0.1)  # the last batch is counted once its handling is over
        return taken, time.monotonic() - started

    taken, elapsed = asyncio.run(run())
    batches = REGISTRY.get_sample_value("cdrsync_stage_batches_total", {"stage": stage})
    busy = REGISTRY.get_sample_value("cdrsync_stage_busy_seconds_total", {"stage": stage})
    assert len(taken.batches) >= 3  # at most 3 records a batch
    assert batches == len(taken.batches)
    assert busy is not None
    assert 0.2 * len(taken.batches) <= busy <= elapsed  # each batch took 0.2 s; never busier than the time that passed
