"""The order stage's park deadlines are forgotten at every rebalance (agents/stages.py): partitions a worker
gets may hold parks another worker made, so the index is rebuilt from the table before anything expires."""

from __future__ import annotations

import asyncio

import pytest

from agents.app import app
from agents.stages import _park_deadlines

pytestmark = pytest.mark.wiring


@pytest.mark.parametrize("signal", ["on_partitions_revoked", "on_partitions_assigned"])
def test_a_rebalance_makes_the_order_stage_rebuild_its_park_deadlines(signal: str) -> None:
    async def rebalance() -> None:
        assert await _park_deadlines.rebuild([])
        _park_deadlines.note(2, 0, "Patient/p1")
        await getattr(app, signal).send(set())  # what Faust sends during a rebalance

    asyncio.run(rebalance())
    assert not _park_deadlines.built and _park_deadlines.size == 0
