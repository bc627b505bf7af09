"""The worker's producer (agents/app.py IdempotentProducer), as Faust builds it when the worker starts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agents.app import app

pytestmark = pytest.mark.wiring


def test_the_worker_producer_waits_for_every_replica_and_is_idempotent() -> None:
    """DESIGN.md decision 2: acks=all and idempotence on every send, not only inside Faust's transactions."""

    async def build() -> tuple[Any, Any]:
        producer = app.producer._new_producer()  # not started: no broker needed
        return producer._sender._acks, producer._txn_manager

    acks, idempotence = asyncio.run(build())
    assert acks == -1  # all in-sync replicas
    assert idempotence is not None  # aiokafka's producer id and sequence numbers: a retried send is not a duplicate
