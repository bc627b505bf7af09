"""After a rebalance Faust seeks every partition back to its committed offset and drops what it had fetched but
not processed. aiokafka seeks only partitions committed above 0: a partition never committed kept its position
past those records, which were then passed over without a gap to show it. The worker's consumer thread seeks
those too (agents/app.py seek_to_committed_or_reset)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from agents.app import seek_to_committed_or_reset

from .conftest import SETTINGS, Central

pytestmark = pytest.mark.integration
RECORDS = 5


async def _positions_after(topic: str, seek: str) -> dict[int, int]:
    """Positions of partitions 0..3 after every record was fetched and the consumer sought back.

    Partition 0 was never committed, 1 was committed at 0, 2 at 3, and 3 stands for a changelog (never
    committed, left alone). seek: "aiokafka" (its own seek_to_committed) or "worker" (the worker's)."""
    producer = AIOKafkaProducer(bootstrap_servers=SETTINGS.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for partition in range(4):
            for n in range(RECORDS):
                await producer.send_and_wait(topic, f"r{n}".encode(), partition=partition)
    finally:
        await producer.stop()
    tps = [TopicPartition(topic, p) for p in range(4)]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=SETTINGS.kafka_bootstrap,
        group_id=f"{topic}-{seek}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.commit({tps[1]: 0, tps[2]: 3})
        for _ in range(30):  # every record fetched, none processed: what a rebalance drops
            if [await consumer.position(tp) for tp in tps] == [RECORDS] * len(tps):
                break
            await consumer.getmany(timeout_ms=1_000)
        else:
            raise AssertionError("the consumer did not fetch every record in 30 tries")
        if seek == "aiokafka":
            await consumer.seek_to_committed()
        else:
            await seek_to_committed_or_reset(consumer, lambda tp: tp.partition != 3, "earliest")
        return {tp.partition: await consumer.position(tp) for tp in tps}
    finally:
        await consumer.stop()


@pytest.fixture
def topic(stack: Central) -> str:
    name = f"test.seek.{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=4, replication_factor=1)])[name].result(30)
    yield name
    admin.delete_topics([name])[name].result(30)


def test_aiokafka_leaves_partitions_never_committed_past_what_it_fetched(topic: str) -> None:
    """What the worker works around; should aiokafka change, this says the workaround can go."""
    assert asyncio.run(_positions_after(topic, "aiokafka")) == {0: RECORDS, 1: RECORDS, 2: 3, 3: RECORDS}


def test_the_worker_seeks_every_stream_partition_back_to_what_was_committed(topic: str) -> None:
    assert asyncio.run(_positions_after(topic, "worker")) == {0: 0, 1: 0, 2: 3, 3: RECORDS}
