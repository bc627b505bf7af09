"""The retry tiers' forwarder: holds each record until it is due, then hands it back to the sink.

It is not a Faust agent on purpose. An agent waiting for a record's due time holds that record
unacknowledged, and Faust waits for every held record before a rebalance can finish: one record due in
an hour would stall the whole worker group for an hour. This forwarder has a consumer group of its own
(<app id>-retry, no state): when the record at the head of a partition is not due, it pauses that
partition and seeks back to the record, so other partitions and tiers go on; it resumes the partition
when the record is due. A record is forwarded to the ready topic, into the partition it failed in
(so per-patient order and the sink's per-resource table stay with it), and only after Kafka has
acknowledged that is its offset committed.

A tier's delay is fixed, so its records fall due in the order they arrive. The wait is capped by the
delay as configured now: shortening a delay also applies to records already waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition

from .deadletter import parse_failure_headers
from .errors import CdrsyncError
from .kafkaadmin import committing_consumer, keyed_producer

__all__ = ["RetryForwarder", "Tier", "wait_seconds"]

log = logging.getLogger("cdrsync.retry")


@dataclass(frozen=True)
class Tier:
    topic: str
    delay_seconds: float


def wait_seconds(due_ms: int, delay_seconds: float, now_ms: int) -> float:
    """How long a record must still wait: until its due time, at most the tier's delay."""
    return max(0.0, min((due_ms - now_ms) / 1000, delay_seconds))


class RetryForwarder:
    """Run in a thread of the worker; stop() ends it."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        tiers: list[Tier],
        ready_topic: str,
        *,
        on_forward: Callable[[str], None] = lambda topic: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tiers = {tier.topic: tier for tier in tiers}
        self.ready_topic = ready_topic
        self._on_forward, self._clock = on_forward, clock
        self._stop = threading.Event()
        self._paused: dict[tuple[str, int], float] = {}
        self.consumer = committing_consumer(bootstrap, group)
        self.producer = keyed_producer(bootstrap)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Forward until stopped; raises CdrsyncError when Kafka will not take a forwarded record."""
        self.consumer.subscribe(
            list(self.tiers), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._revoked
        )
        try:
            while not self._stop.is_set():
                self._resume_due()
                message = self.consumer.poll(0.5)
                if message is None:
                    continue
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.warning("retry tier read error: %s", error)
                    continue
                self._handle(message)
        finally:
            self.consumer.close()
            self.producer.flush(10)

    def _assigned(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        """A partition (given back) is read from its committed record, paused again if that is not due yet:
        librdkafka keeps a partition paused across its revocation and assignment, so one paused here before
        another worker took it over would come back paused, with nothing here to resume it."""
        if partitions:
            consumer.resume(partitions)

    def _revoked(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._paused.pop((tp.topic, tp.partition), None)

    def _resume_due(self) -> None:
        now = self._clock()
        due = [key for key, at in self._paused.items() if at <= now]
        if due:
            self.consumer.resume([TopicPartition(topic, partition) for topic, partition in due])
            for key in due:
                del self._paused[key]

    def _handle(self, message: Message) -> None:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        raw: Any = message.headers() or []
        headers: list[tuple[str, bytes | str | None]] = [(str(k), v) for k, v in raw]
        info = parse_failure_headers(headers)
        wait = wait_seconds(info.due_ms if info else 0, self.tiers[topic].delay_seconds, int(self._clock() * 1000))
        if wait > 0:
            here = TopicPartition(topic, partition, offset)
            self.consumer.pause([here])
            self.consumer.seek(here)  # fetched again from this record when resumed
            self._paused[(topic, partition)] = self._clock() + wait
            return
        target_partition = info.origin_partition if info and info.origin_topic == self.ready_topic else None
        failures: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        kwargs: dict[str, Any] = {"headers": headers, "on_delivery": delivered}
        if target_partition is not None:
            kwargs["partition"] = target_partition
        self.producer.produce(self.ready_topic, message.value(), message.key(), **kwargs)
        if self.producer.flush(30) or failures:
            raise CdrsyncError(f"cannot forward {topic}[{partition}]@{offset} to {self.ready_topic}: {failures[:1]}")
        self.consumer.commit(offsets=[TopicPartition(topic, partition, offset + 1)], asynchronous=False)
        self._on_forward(topic)
