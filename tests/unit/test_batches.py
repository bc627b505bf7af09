"""A stage's batches (agents/batches.py take_batches): a lone record is handled without waiting out the
batch window, a burst is still taken together, never more than the batch's size, and no record is
acknowledged before the code handling its batch is done with it.

Each test runs a Faust agent on an in-memory channel (Faust's test_context): no broker is contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import faust
import pytest

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


def _agent(max_: int, close_early: bool) -> tuple[Any, Taken]:
    app = faust.App(f"cdrsync-test-batches-{max_}-{close_early}", broker="kafka://localhost:1", store="memory://")
    taken = Taken()

    @app.agent()
    async def take(stream: faust.StreamT[Any]) -> None:
        async for events in take_batches(stream, max_, _WINDOW, close_early=close_early):
            taken.acked_while_handled.append(any(event.message.acked for event in events))
            await asyncio.sleep(0)  # the handler gives way, as every real one does
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
