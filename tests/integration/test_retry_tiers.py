"""The retry tiers' forwarder (pipeline/retrytiers.py) against the real broker, across a rebalance."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.deadletter import FailureInfo, failure_headers
from pipeline.dlq import read_all
from pipeline.kafkaadmin import keyed_producer
from pipeline.retrytiers import RetryForwarder, Tier
from tests.integration.conftest import SETTINGS, Central, wait_for

pytestmark = pytest.mark.integration


def _forwarder(group: str, tier: str, ready: str) -> tuple[RetryForwarder, threading.Thread]:
    forwarder = RetryForwarder(SETTINGS.kafka_bootstrap, group, [Tier(tier, 60)], ready)
    thread = threading.Thread(target=forwarder.run, daemon=True)
    thread.start()
    return forwarder, thread


def test_a_partition_paused_before_another_worker_took_it_is_forwarded_once_it_comes_back(
    stack: Central, run_id: str
) -> None:
    """Worker A pauses a tier partition whose record is not due yet; worker B joins and takes it, then stops,
    and the partition comes back to A. librdkafka keeps a partition paused across its revocation: A must
    read it again, or its records wait there until A restarts (and later versions behind them at the sink)."""
    tier, ready, group = f"test.retry.{run_id}", f"test.retry-ready.{run_id}", f"test-retry-{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for future in admin.create_topics(
        [NewTopic(t, num_partitions=2, replication_factor=1) for t in (tier, ready)]
    ).values():
        future.result(timeout=30)
    started: list[tuple[RetryForwarder, threading.Thread]] = []
    try:
        due_ms = int(time.time() * 1000) + 20_000  # after B took its partition and left
        producer = keyed_producer(SETTINGS.kafka_bootstrap)
        for partition in range(2):
            info = FailureInfo("sink", "target_unavailable", "503", 1, 0, 0, ready, partition, 7, due_ms=due_ms)
            producer.produce(
                tier, f"record {partition}".encode(), b"key", partition=partition, headers=failure_headers(info)
            )
        assert producer.flush(30) == 0

        first = _forwarder(group, tier, ready)
        started.append(first)
        wait_for(lambda: len(first[0]._paused) == 2 or None, timeout=60, what="A to pause both partitions")
        second = _forwarder(group, tier, ready)
        started.append(second)
        wait_for(lambda: len(second[0]._paused) == 1 or None, timeout=60, what="B to take and pause one partition")
        second[0].stop()
        second[1].join(timeout=30)
        assert not second[1].is_alive()

        def forwarded() -> list[bytes] | None:
            values = sorted(m.value() for m in read_all(SETTINGS.kafka_bootstrap, ready))
            return values if len(values) == 2 else None

        assert wait_for(forwarded, timeout=90, what="both records forwarded by A") == [b"record 0", b"record 1"]
    finally:
        for forwarder, thread in started:
            forwarder.stop()
            thread.join(timeout=30)
        admin.delete_topics([tier, ready])
