"""A stage's outputs leave at once when its batch is sent, not after the producer's linger."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka.admin import AdminClient, NewTopic

from agents.sending import send_now

from .conftest import SETTINGS, Central

pytestmark = pytest.mark.integration
_HOUR_MS = 3_600_000


async def _send_and_read(topic: str, expedite: bool) -> tuple[bool, list[bytes]]:
    """Send three records with an hour's linger; whether they were acknowledged within 15 s, and what a
    consumer then reads."""
    producer = AIOKafkaProducer(
        bootstrap_servers=SETTINGS.kafka_bootstrap, linger_ms=_HOUR_MS, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, f"r{n}".encode(), partition=0) for n in range(3)]
        if expedite:
            send_now(producer)
        done, _ = await asyncio.wait(futures, timeout=15)
        acknowledged = len(done) == len(futures)
        if expedite:  # the producer keeps working: a later record goes out the same way
            later = await producer.send(topic, b"r3", partition=0)
            send_now(producer)
            await asyncio.wait_for(later, timeout=60)
        else:  # what still lingers, so that it can be read below
            send_now(producer)
            await asyncio.wait(futures, timeout=60)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=SETTINGS.kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        values: list[bytes] = []
        while len(values) < (4 if expedite else 3):
            batch = await consumer.getmany(timeout_ms=10_000)
            values += [m.value for records in batch.values() for m in records if m.value is not None]
    finally:
        await consumer.stop()
    return acknowledged, values


@pytest.mark.parametrize("expedite", [True, False])
def test_send_now_delivers_a_batch_without_waiting_for_the_linger(stack: Central, expedite: bool) -> None:
    topic = f"test.sending.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(30)
    try:
        acknowledged, values = asyncio.run(_send_and_read(topic, expedite))
    finally:
        admin.delete_topics([topic])[topic].result(30)
    assert acknowledged is expedite  # without send_now the records wait out the hour
    assert values == [b"r0", b"r1", b"r2", b"r3"][: len(values)] and len(values) == (4 if expedite else 3)
