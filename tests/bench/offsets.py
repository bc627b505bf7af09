"""Kafka positions the benchmark reads from outside the worker: end offsets, committed offsets, lag."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient

__all__ = [
    "Offsets",
    "commit_group",
    "delete_topics",
    "end_offsets",
    "group_lag",
    "read_range",
    "records_on",
    "wait_for_records",
]

Offsets = dict[int, int]  # partition -> offset


def _consumer(bootstrap: str, group: str = "cdrsync-bench-probe") -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False, "log_level": 3})


@contextlib.contextmanager
def read_range(
    bootstrap: str, topic: str, start: Offsets, end: Offsets, group: str, timeout: float
) -> Iterator[Iterator[Message]]:
    """The records of `topic` from `start` up to `end` (exclusive), in consume(500) batches; each consume waits
    at most `timeout` seconds for its 500 (the range's last batch is smaller). The consumer closes on leaving."""
    consumer = _consumer(bootstrap, group)
    consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])

    def records() -> Iterator[Message]:
        remaining = {p for p in end if end[p] > start.get(p, 0)}
        while remaining:
            for message in consumer.consume(500, timeout=timeout):
                if message.error() is not None:
                    continue
                partition, offset = message.partition() or 0, message.offset() or 0
                if offset + 1 >= end[partition]:
                    remaining.discard(partition)
                yield message

    try:
        yield records()
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> Offsets:
    """The high watermark of every partition of a topic."""
    consumer = _consumer(bootstrap)
    try:
        partitions = consumer.list_topics(topic, timeout=15).topics[topic].partitions
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in partitions}
    finally:
        consumer.close()


def records_on(bootstrap: str, prefixes: tuple[str, ...]) -> dict[str, int]:
    """topic -> records written to it (the sum of its partitions' high watermarks), for every topic whose name
    starts with one of the prefixes, but Faust's assignor topic (no records of the pipeline's)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    names = [n for n in admin.list_topics(timeout=15).topics if n.startswith(prefixes) and "__assignor" not in n]
    return {name: sum(end_offsets(bootstrap, name).values()) for name in sorted(names)}


def commit_group(bootstrap: str, group: str, positions: dict[str, Offsets]) -> None:
    """Set a consumer group's committed offsets (the group must have no running member)."""
    consumer = _consumer(bootstrap, group)
    try:
        offsets = [TopicPartition(t, p, o) for t, parts in positions.items() for p, o in parts.items()]
        consumer.commit(offsets=offsets, asynchronous=False)
    finally:
        consumer.close()


def group_lag(bootstrap: str, group: str, topics: Iterable[str]) -> int:
    """Records of these topics the group has not committed yet (a partition never committed counts whole)."""
    consumer = _consumer(bootstrap, group)
    try:
        wanted = []
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=15).topics.get(topic)
            if metadata is None or metadata.error is not None:
                continue
            wanted += [TopicPartition(topic, p) for p in metadata.partitions]
        lag = 0
        for tp in consumer.committed(wanted, timeout=15):
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=15)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def wait_for_records(bootstrap: str, topic: str, before: Offsets, count: int, timeout: float) -> Offsets:
    """Wait until `count` records arrived on a topic after `before`; the end offsets then."""
    deadline = time.monotonic() + timeout
    while True:
        now = end_offsets(bootstrap, topic)
        arrived = sum(now.values()) - sum(before.values())
        if arrived >= count:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(f"{topic}: {arrived} of {count} records arrived in {timeout:.0f}s")
        time.sleep(0.5)


def delete_topics(bootstrap: str, prefixes: tuple[str, ...]) -> list[str]:
    """Delete every topic whose name starts with one of the prefixes (a run's own topics)."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    names = [name for name in admin.list_topics(timeout=15).topics if name.startswith(prefixes)]
    if names:
        for future in admin.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):  # already gone, or being deleted
                future.result(timeout=60)
    return names
