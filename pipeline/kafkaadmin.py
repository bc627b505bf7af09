"""Topic administration from topics.yaml (confluent-kafka AdminClient)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewPartitions, NewTopic

from .config import Config
from .errors import CdrsyncError, ConfigError, TargetUnavailableError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AcknowledgedProducer",
    "TopicPlan",
    "apply_topics",
    "committed_offsets",
    "committing_consumer",
    "declared_topics",
    "keyed_producer",
    "wait_for_topics",
]

log = logging.getLogger("cdrsync.kafka")
Item = TypeVar("Item")
#: The largest record the broker takes (its message.max.bytes, compose/kafka/server.properties), and so every
#: producer of ours: a record the worker wrote must also go through a retry tier or a replay.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def keyed_producer(bootstrap: str, *, linger_ms: int | None = None) -> Producer:
    """An idempotent, acks=all producer that puts a key where Faust (aiokafka) and Java clients put it.

    librdkafka's default partitioner is not theirs; murmur2 is, so a record sent back into a pipeline
    topic lands in the same partition as the records of its patient. linger_ms: how long records gather
    into one request before they are sent (None: librdkafka's default); flush() sends them at once.
    """
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "message.max.bytes": MAX_MESSAGE_BYTES,  # librdkafka's default is 1 MB
    }
    if linger_ms is not None:
        config["linger.ms"] = linger_ms
    return Producer(config)


def committing_consumer(bootstrap: str, group: str, **extra: Any) -> Consumer:
    """A consumer of a worker's own thread: its group commits only what the caller commits, reads a partition
    without a commit from its start, and gives partitions up one by one on a rebalance (cooperative-sticky)."""
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
            **extra,
        }
    )


def committed_offsets(admin: AdminClient, group: str, timeout: float) -> dict[tuple[str, int], int]:
    """(topic, partition) -> the offset a consumer group has committed there; nothing for a group unknown to
    the broker."""
    request = [ConsumerGroupTopicPartitions(group)]
    try:
        result = next(iter(admin.list_consumer_group_offsets(request, request_timeout=timeout).values())).result()
    except KafkaException as exc:
        if "GROUP_ID_NOT_FOUND" in str(exc):
            return {}
        raise
    return {(tp.topic, tp.partition): tp.offset for tp in result.topic_partitions or [] if tp.offset >= 0}


class AcknowledgedProducer:
    """keyed_producer for operator commands whose every record must reach Kafka: failures are collected
    from the delivery reports, and finish() flushes and raises on the first one."""

    def __init__(self, bootstrap: str) -> None:
        self.producer = keyed_producer(bootstrap)
        self.failures: list[str] = []

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failures.append(str(err))

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **kwargs: Any) -> None:
        self.producer.produce(topic, value, key, on_delivery=self._delivered, **kwargs)

    def finish(self, what: str) -> None:
        """Everything acknowledged, or CdrsyncError."""
        if self.producer.flush(30) or self.failures:
            raise CdrsyncError(f"Kafka did not acknowledge every {what}: {self.failures[:1]}")

    def send_then_record(
        self,
        items: Sequence[Item],
        send: Callable[[Item, Callable[[Any, Any], None]], None],
        record: Callable[[Item], None],
        what: Callable[[Item], str],
        progress: Callable[[int, int], None],
    ) -> int:
        """Act on items (replay dead letters, resolve conflicts), then record each as done, in windows of 100.

        `send(item, report)` produces what acts, with `report` as its delivery callback (if it sends anything);
        only once Kafka acknowledged that does `record(item)` produce what says it is done (a resolution, an
        audit event). A record saying done while its action never reached Kafka would hide it: out of the
        lists, left out of the next run. Those acknowledged are recorded even when others were not; then
        CdrsyncError names the first that was not (run the command again for it). How many were done.
        """
        done = 0
        for start in range(0, len(items), 100):
            window = items[start : start + 100]
            refused: dict[int, str] = {}

            def reporter(n: int, refused: dict[int, str] = refused) -> Callable[[Any, Any], None]:
                def report(err: Any, msg: Any) -> None:
                    if err is not None:
                        refused[n] = str(err)

                return report

            for n, item in enumerate(window):
                try:
                    send(item, reporter(n))
                except (KafkaException, BufferError) as error:  # refused at once (e.g. no such partition)
                    refused[n] = str(error)
            if undelivered := self.producer.flush(30):  # which ones is not known: none is recorded as done
                raise CdrsyncError(f"Kafka did not acknowledge {undelivered} record(s) within 30 s; {done} done")
            for n, item in enumerate(window):
                if n not in refused:
                    record(item)
            self.finish("record of what was done")
            done += len(window) - len(refused)
            if refused:
                first = min(refused)
                raise CdrsyncError(
                    f"Kafka did not take {what(window[first])}: {refused[first]}; {done} done, run it again for "
                    "the rest"
                )
            progress(done, len(items))
        return done


@dataclass(frozen=True)
class TopicPlan:
    """A topic as declared: name, partitions, replication, configuration."""

    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def declared_topics(config: Config) -> list[TopicPlan]:
    """Every topic topics.yaml declares, source topics expanded for each site."""
    t = config.topics
    rf = t.defaults.replication_factor
    plans = [
        TopicPlan(config.source_topic(site), t.source.partitions, rf, dict(t.source.config))
        for site in [*config.source_sites(), *config.capture_sites()]
    ]
    plans += [TopicPlan(spec.name, t.partitions_of(key), rf, dict(spec.config)) for key, spec in t.topics.items()]
    plans += [
        TopicPlan(tier.name, tier.partitions or t.defaults.partitions, rf, dict(tier.config)) for tier in t.retry_tiers
    ]
    return plans


def apply_topics(
    bootstrap: str, plans: list[TopicPlan], *, dry_run: bool = False, report: Callable[[str], None] = print
) -> int:
    """Create missing topics, grow partitions, align configs. Returns the number of changes."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})  # librdkafka: errors only
    try:
        existing = admin.list_topics(timeout=15).topics
    except KafkaException as exc:
        raise TargetUnavailableError(f"Kafka at {bootstrap} is not reachable: {exc}") from None
    changes = 0
    for plan in plans:
        current = existing.get(plan.name)
        if current is None:
            report(f"create  {plan.name} partitions={plan.partitions} rf={plan.replication_factor} {plan.config}")
            changes += 1
            if not dry_run:
                new = NewTopic(plan.name, plan.partitions, plan.replication_factor, config=plan.config)
                _wait(admin.create_topics([new]))
            continue
        have = len(current.partitions)
        if have > plan.partitions:
            raise ConfigError(
                f"topics.yaml: {plan.name} declares {plan.partitions} partitions but has {have}; "
                "partitions cannot shrink"
            )
        if have < plan.partitions:
            report(f"grow    {plan.name} partitions {have} -> {plan.partitions}")
            changes += 1
            if not dry_run:
                _wait(admin.create_partitions([NewPartitions(plan.name, plan.partitions)]))
        if plan.config:
            changes += _align_config(admin, plan, dry_run, report)
    return changes


def _align_config(admin: AdminClient, plan: TopicPlan, dry_run: bool, report: Callable[[str], None]) -> int:
    resource = ConfigResource(ConfigResource.Type.TOPIC, plan.name)
    described = next(iter(admin.describe_configs([resource]).values())).result(timeout=15)
    differ = {k: v for k, v in plan.config.items() if k not in described or described[k].value != v}
    if not differ:
        return 0
    report(f"config  {plan.name} {differ}")
    if not dry_run:
        for key, value in plan.config.items():
            resource.set_config(key, value)
        _wait(admin.alter_configs([resource]))
    return 1


def _wait(futures: Mapping[Any, Future[Any]]) -> None:
    for name, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise TargetUnavailableError(f"Kafka refused the change to {name}: {exc}") from None


async def wait_for_topics(
    topics: Iterable[str],
    listed: Callable[[], Awaitable[set[str]]],
    timeout: float,
    *,
    interval: float = 0.2,
    report_every: float = 5.0,
) -> list[str]:
    """Ask `listed` which of the topics the broker lists, again every `interval` seconds, until it lists all of
    them or `timeout` seconds have passed; returns the ones still missing, sorted (none: all are there).

    A request that fails counts as listing none of them. Every `report_every` seconds of waiting, the missing
    ones are logged."""
    wanted = set(topics)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reported = started
    while True:
        try:
            missing = sorted(wanted - await listed())
        except Exception as error:  # a broker not answering yet: wait as for a topic not listed yet
            missing, why = sorted(wanted), f" ({error})"
        else:
            why = ""
        now = loop.time()
        if not missing or now - started >= timeout:
            return missing
        if now - reported >= report_every:
            log.info("waiting for the broker to list %d topic(s): %s%s", len(missing), ", ".join(missing), why)
            reported = now
        await asyncio.sleep(interval)
