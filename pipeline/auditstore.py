"""The audit store: the audit topic into PostgreSQL's audit.event, a batch at a time.

It is not a Faust agent on purpose. Every step of every record emits an audit event (about two per
resource written), and as an agent each of them went through Faust's consumer thread, stream, batch and
acknowledgement machinery: about a sixth of the worker's CPU when it drains a back-load (README
Performance). Here a librdkafka consumer takes them in batches, in a thread of the worker, with a consumer
group of its own (<app id>-audit): from the first event on, a batch gathers what arrives within
CDRSYNC_AUDIT_BATCH_SECONDS (or until it is full), so that a busy worker commits one insert for many events.

Nothing is lost: a batch's rows go in one transaction, and only once PostgreSQL has committed them are the
batch's offsets committed. An insert is idempotent (keyed by topic, partition and offset), so a batch read
again after a crash or a rebalance inserts nothing twice. While PostgreSQL is away the batch is kept and
tried again every few seconds, and nothing further is read: Kafka keeps the events meanwhile. (A wait longer
than the consumer's max.poll.interval.ms lets the group hand the partitions on; the batch is then read again
by their new owner.)

A worker upgraded from a version whose Faust agent stored the events starts the store where that agent's
consumer group (the app id) left off on the audit topic (seed_offsets), instead of reading the whole topic,
which is kept forever, once more.

A malformed event (our own record: a bug) does not hold the others: the batch is then inserted one event at
a time, and each malformed one goes to the dead-letter topic with the reason, acknowledged by Kafka before
the batch is committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient

from .audit import AUDIT_TABLE_DDL, insert_events
from .deadletter import failure_headers, failure_info, parse_failure_headers
from .kafkaadmin import AcknowledgedProducer, committed_offsets, committing_consumer
from .metrics import DEAD_LETTERS, STAGE_BATCHES, STAGE_BUSY_SECONDS, STAGE_SECONDS

__all__ = ["AuditStore", "commit_offsets", "run_in_thread", "seed_offsets"]

log = logging.getLogger("cdrsync.audit")
STAGE = "audit"
_TIMEOUT = 30.0  # seconds an admin request to the broker may take
_MALFORMED = (psycopg.DataError, ValueError, KeyError, TypeError)  # our own record, malformed: a bug


def commit_offsets(messages: list[Message]) -> list[TopicPartition]:
    """The offsets to commit once these records are stored: per partition, one past the highest."""
    highest: dict[tuple[str, int], int] = {}
    for message in messages:
        topic, partition, offset = message.topic(), message.partition(), message.offset()
        assert topic is not None and partition is not None and offset is not None
        highest[(topic, partition)] = max(offset, highest.get((topic, partition), offset))
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in sorted(highest.items())]


def seed_offsets(bootstrap: str, group: str, previous_group: str, topic: str) -> list[TopicPartition]:
    """If `group` has committed nothing on `topic` yet, commit for it what `previous_group` has there, so it
    starts where that group left off; the offsets seeded (none if there was nothing to do). A group another
    worker has already joined refuses the change: that worker got there first, and nothing is seeded."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if any(t == topic for t, _ in committed_offsets(admin, group, _TIMEOUT)):
        return []
    committed = committed_offsets(admin, previous_group, _TIMEOUT).items()
    previous = [TopicPartition(t, partition, offset) for (t, partition), offset in committed if t == topic]
    if not previous:
        return []
    request = [ConsumerGroupTopicPartitions(group, previous)]
    try:
        next(iter(admin.alter_consumer_group_offsets(request, request_timeout=_TIMEOUT).values())).result()
    except KafkaException as error:
        log.info("audit store: offsets of %s not seeded from %s (%s)", group, previous_group, error)
        return []
    log.info("audit store: %s starts where %s left off on %s", group, previous_group, topic)
    return previous


def _entry(message: Message) -> tuple[str, int, int, bytes]:
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset, message.value() or b""


class AuditStore:
    """Run in a thread of the worker; stop() ends it after the batch in hand. run() raises CdrsyncError when
    the dead-letter topic will not take a malformed event: the batch is then not committed."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        dead_letter_topic: str,
        dsn: str,
        *,
        previous_group: str | None = None,
        batch_max: int = 500,
        gather_seconds: float = 0.1,
        reconnect_seconds: float = 5.0,
    ) -> None:
        self.topic, self.dead_letter_topic, self.dsn = topic, dead_letter_topic, dsn
        self.bootstrap, self.group, self.previous_group = bootstrap, group, previous_group
        self.batch_max, self.gather_seconds, self.reconnect_seconds = batch_max, gather_seconds, reconnect_seconds
        self._stop = threading.Event()
        self._connection: psycopg.Connection[Any] | None = None
        # PostgreSQL away longer than max.poll.interval.ms: the partitions go to another worker.
        self.consumer = committing_consumer(bootstrap, group, **{"max.poll.interval.ms": 600_000})
        self.producer = AcknowledgedProducer(bootstrap)
        self._waited = STAGE_SECONDS.labels(STAGE, "wait")
        self._handled = STAGE_SECONDS.labels(STAGE, "handle")
        self._batches, self._busy = STAGE_BATCHES.labels(STAGE), STAGE_BUSY_SECONDS.labels(STAGE)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        if self.previous_group:
            seed_offsets(self.bootstrap, self.group, self.previous_group, self.topic)
        self.consumer.subscribe([self.topic])
        try:
            while not self._stop.is_set():
                first = self.consumer.poll(0.5)  # from the first event on, a batch gathers for gather_seconds
                if first is None:
                    continue
                rest = self.consumer.consume(self.batch_max - 1, self.gather_seconds) if self.batch_max > 1 else []
                batch = self._readable([first, *rest])
                if batch:
                    self._handle(batch)
        finally:
            self.consumer.close()
            self.producer.producer.flush(10)
            if self._connection is not None:
                self._connection.close()

    def _readable(self, messages: list[Message]) -> list[Message]:
        batch = []
        for message in messages:
            error = message.error()
            if error is None:
                batch.append(message)
            elif error.fatal():
                raise KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("audit store: read error: %s", error)
        return batch

    def _handle(self, batch: list[Message]) -> None:
        taken = time.time()
        for message in batch:
            _, stamp = message.timestamp()
            if stamp > 0:  # the producer's clock: a skewed one reads as no wait, never as a negative one
                self._waited.observe(max(0.0, taken - stamp / 1000))
        if not self._store(batch):
            return  # stopped while PostgreSQL was away: not committed, read again by the next worker
        try:
            self.consumer.commit(offsets=commit_offsets(batch), asynchronous=False)
        except KafkaException as error:  # no longer ours (a rebalance): the new owner reads them again
            log.warning("audit store: offsets of a stored batch not committed (%s); it will be read again", error)
        done = time.time()
        self._batches.inc()
        self._busy.inc(max(0.0, done - taken))
        for _ in batch:
            self._handled.observe(done - taken)

    def _store(self, batch: list[Message]) -> bool:
        """Insert the batch, waiting while PostgreSQL is away; False if stopped before it was stored."""
        while True:
            try:
                self._insert(self._connected(), batch)
                return True
            except psycopg.OperationalError as error:
                log.error(
                    "audit database unreachable (%s); %d events kept, trying again in %gs",
                    type(error).__name__,
                    len(batch),
                    self.reconnect_seconds,
                )
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
                if self._stop.wait(self.reconnect_seconds):
                    return False

    def _connected(self) -> psycopg.Connection[Any]:
        if self._connection is None or self._connection.closed:
            connection = psycopg.connect(self.dsn)
            with connection.cursor() as cursor:
                cursor.execute(AUDIT_TABLE_DDL)
            connection.commit()
            self._connection = connection
        return self._connection

    def _insert(self, connection: psycopg.Connection[Any], batch: list[Message]) -> None:
        try:
            insert_events(connection, [_entry(message) for message in batch])
            return
        except _MALFORMED:
            connection.rollback()
        malformed: list[tuple[Message, BaseException]] = []
        for message in batch:
            try:
                insert_events(connection, [_entry(message)])
            except _MALFORMED as error:
                connection.rollback()
                malformed.append((message, error))
        if malformed:
            self._dead_letter(malformed)

    def _dead_letter(self, malformed: list[tuple[Message, BaseException]]) -> None:
        now_ms = int(time.time() * 1000)
        for message, error in malformed:
            topic, partition, offset, value = _entry(message)
            raw: Any = message.headers() or []
            headers: list[tuple[str, bytes | str | None]] = [(str(k), v) for k, v in raw]
            info = failure_info(
                STAGE,
                error,
                attempts=1,
                now_ms=now_ms,
                origin=(topic, partition, offset),
                previous=parse_failure_headers(headers),
            )
            DEAD_LETTERS.labels(STAGE, "", "", info.error_class).inc()
            log.error(
                "dead letter: stage=%s error_class=%s origin=%s[%d]@%d attempts=%d: %s",
                STAGE,
                info.error_class,
                topic,
                partition,
                offset,
                info.attempts,
                info.message,
                extra={"stage": STAGE, "error_class": info.error_class, "source_topic": topic},
            )
            out: list[tuple[str, str | bytes | None]] = list(failure_headers(info))
            self.producer.produce(self.dead_letter_topic, value, message.key(), headers=out)
        self.producer.finish(f"dead letter of a malformed audit event to {self.dead_letter_topic}")


def run_in_thread(store: AuditStore, on_failure: Callable[[BaseException], None]) -> threading.Thread:
    """Start the store in a daemon thread; a failure goes to on_failure (the worker exits: nothing committed)."""

    def run() -> None:
        try:
            store.run()
        except BaseException as error:  # handed on: the caller decides, never silent
            on_failure(error)

    thread = threading.Thread(target=run, name="audit-store", daemon=True)
    thread.start()
    return thread
