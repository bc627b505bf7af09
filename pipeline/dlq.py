"""`cdrsync dlq`: what is in the dead-letter topic, why, and putting it back (replay) or setting it aside (discard).

A dead letter's id is `<partition>:<offset>` in the dead-letter topic. Replay sends the record,
unchanged, back to the input topic of the stage that failed it, with its failure headers (so the sink
recognises the version that holds later ones, and the target ids are the same deterministic ones) and
the retry tiers reset. Discard resolves a dead letter without writing it; for a sink dead letter it
also tells the sink to release the versions of that resource that wait behind it. Both are recorded
in a compacted topic (so `list` shows what is still open) and as audit events. Both are dry runs
unless --execute is given.
"""

from __future__ import annotations

import getpass
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from .config import Config
from .deadletter import DISCARD_HEADER, REPLAY_HEADER, FailureInfo, failure_headers, parse_failure_headers
from .errors import CdrsyncError
from .kafkaadmin import AcknowledgedProducer
from .reconcile import dead_letter_ref
from .tap import decode_value

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "iso_time",
    "operator_name",
    "parse_position",
    "read_all",
    "read_at",
    "read_dead_letters",
    "record_ids",
    "resolutions",
    "resolve",
]

#: the stage that dead-lettered a record → the topics.yaml key of that stage's input (None: its source topic)
STAGE_INPUT = {
    "normalize": None,
    "identity": "normalized",
    "order": "identified",
    "backflow": "identified",
    "sink": "ready",
    "writeback": "writeback",
}


@dataclass(frozen=True)
class DeadLetter:
    """One record of the dead-letter topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    failure: FailureInfo | None
    decoded: Any
    site: str
    resource_type: str
    target_ref: str | None
    resolution: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def target(self) -> str | None:
        """Where the record was bound (a write-back record: the hospital), when it is a record of ours."""
        routed = isinstance(self.decoded, dict) and self.decoded.get("_schema") == "routed_resource"
        return str(self.decoded.get("target") or "") or None if routed else None

    @property
    def failed_ms(self) -> int:
        return self.failure.last_failure_ms if self.failure else self.timestamp_ms

    def summary(self) -> dict[str, Any]:
        """Ids, reason and where it came from; no clinical content."""
        f = self.failure
        return {
            "id": self.id,
            "failed_at": iso_time(self.failed_ms),
            "first_failed_at": iso_time(f.first_failure_ms) if f else None,
            "stage": f.stage if f else None,
            "error_class": f.error_class if f else None,
            "attempts": f.attempts if f else None,
            "site": self.site,
            "resource_type": self.resource_type,
            "target_ref": self.target_ref,
            "target": self.target,
            "source": f"{f.origin_topic}[{f.origin_partition}]@{f.origin_offset}" if f else None,
            "reason": f.message if f else None,
            "status": self.resolution["action"] if self.resolution else "open",
        }


@dataclass(frozen=True)
class DeadLetterFilter:
    """Which dead letters a command acts on; every given criterion must match."""

    ids: frozenset[str] = frozenset()
    site: str | None = None
    target: str | None = None
    stage: str | None = None
    error_class: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    include_resolved: bool = False

    def matches(self, letter: DeadLetter) -> bool:
        f = letter.failure
        return (
            (not self.ids or letter.id in self.ids)
            and (self.include_resolved or bool(self.ids) or letter.resolution is None)
            and (self.site is None or letter.site == self.site)
            and (self.target is None or letter.target == self.target)
            and (self.stage is None or (f is not None and f.stage == self.stage))
            and (self.error_class is None or (f is not None and f.error_class == self.error_class))
            and (self.since_ms is None or letter.failed_ms >= self.since_ms)
            and (self.until_ms is None or letter.failed_ms < self.until_ms)
        )


def iso_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


def parse_time(text: str, now: float | None = None) -> int:
    """An ISO 8601 time, or an age like 30m, 12h, 7d → epoch milliseconds."""
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        return int((now - int(text[:-1]) * units[text[-1]]) * 1000)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise CdrsyncError(f"{text!r} is neither an ISO 8601 time nor an age like 30m, 12h, 7d") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


_STALL_SECONDS = 10.0  # no record, and no end of partition, for this long: the read has stalled


def _reader(bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "cdrsync-topic-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )


def _partitions(consumer: Consumer, topic: str) -> Any:
    metadata = consumer.list_topics(topic, timeout=15).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise CdrsyncError(f"topic {topic!r} does not exist (cdrsync topics apply creates it)")
    return metadata.partitions


def parse_position(record_id: str) -> tuple[int, int]:
    """A record id `<partition>:<offset>` (what `dlq list` and `conflicts list` show) as (partition, offset)."""
    partition, sep, offset = record_id.strip().partition(":")
    if not sep or not partition.isdigit() or not offset.isdigit():
        raise CdrsyncError(f"{record_id!r} is not a record id: ids are partition:offset, e.g. 3:1207")
    return int(partition), int(offset)


def record_ids(given: Iterable[str] | None) -> frozenset[str]:
    """Record ids as typed (`3:1207`, ` 3:01207`) in the form `list` shows them; CdrsyncError for one malformed."""
    return frozenset("{}:{}".format(*parse_position(record_id)) for record_id in given or ())


def read_at(bootstrap: str, topic: str, ids: Iterable[str]) -> Iterator[Any]:
    """The records of a topic at the given ids (`<partition>:<offset>`), each read where it is, not the whole
    topic; an id no record has (past the end, before the start, no such partition) is left out."""
    positions = sorted({parse_position(record_id) for record_id in ids})
    consumer = _reader(bootstrap)
    try:
        partitions = _partitions(consumer, topic)
        for partition, offset in positions:
            if partition not in partitions:
                continue
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)
            if not low <= offset < high:
                continue
            consumer.assign([TopicPartition(topic, partition, offset)])
            batch = consumer.consume(1, timeout=10)
            if not batch:
                raise CdrsyncError(f"reading {topic}[{partition}]@{offset}: no answer from Kafka in 10 s")
            message = batch[0]
            error = message.error()
            if error is not None and error.code() != KafkaError._PARTITION_EOF:
                raise CdrsyncError(f"reading {topic}[{partition}]@{offset}: {error}")
            if error is None and message.offset() == offset:  # a compacted topic may have moved on past it
                yield message
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str) -> Iterator[Any]:
    """Every record of a topic up to its current end (not waiting for more)."""
    consumer = _reader(bootstrap)
    try:
        partitions = _partitions(consumer, topic)
        assignments, remaining, ends = [], set(), {}
        for p in partitions:
            # Asked of the broker: a cached watermark is unknown (-1001) until a fetch returned, and with it
            # every partition looked finished at its first record, leaving out what came after the first batch.
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=15)
            if high > low:
                assignments.append(TopicPartition(topic, p, low))
                remaining.add(p)
                ends[p] = high
        if not assignments:
            return
        consumer.assign(assignments)
        stalled_at = time.monotonic() + _STALL_SECONDS
        while remaining:
            # A short wait per call: librdkafka's consume() waits out its whole timeout unless the batch fills,
            # which made every read of a small topic take that long.
            batch = consumer.consume(500, timeout=0.2)
            if batch:
                stalled_at = time.monotonic() + _STALL_SECONDS
            elif time.monotonic() >= stalled_at:
                raise CdrsyncError(f"reading {topic} stalled with partitions {sorted(remaining)} unfinished")
            for message in batch:
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        remaining.discard(message.partition())
                        continue
                    raise CdrsyncError(f"reading {topic}: {error}")
                yield message
                partition = int(message.partition() or 0)
                if int(message.offset() or 0) + 1 >= ends[partition]:
                    remaining.discard(partition)
    finally:
        consumer.close()


def resolutions(bootstrap: str, topic: str) -> dict[str, dict[str, Any]]:
    """Id → its latest resolution, from a compacted topic (dead letters: replay or discard)."""
    result: dict[str, dict[str, Any]] = {}
    for message in read_all(bootstrap, topic):
        key = (message.key() or b"").decode()
        if message.value() is None:
            result.pop(key, None)
        else:
            result[key] = orjson.loads(message.value())
    return result


def read_dead_letters(bootstrap: str, config: Config, ids: Iterable[str] | None = None) -> list[DeadLetter]:
    """Every dead letter, with what was done about it; with ids, only those (read where they are)."""
    done = resolutions(bootstrap, config.topics.name("dlq_resolved"))
    topic = config.topics.name("dlq")
    letters = []
    for message in read_all(bootstrap, topic) if ids is None else read_at(bootstrap, topic, ids):
        headers = [(k, v if isinstance(v, bytes) else b"") for k, v in (message.headers() or [])]
        failure = parse_failure_headers(headers)
        decoded = decode_value(message.value())
        site, resource_type = _site_and_type(config, decoded, failure)
        item = {"value": decoded, "topic": config.topics.name("dlq"), "failure": failure.__dict__ if failure else {}}
        letter_id = f"{message.partition()}:{message.offset()}"
        letters.append(
            DeadLetter(
                partition=message.partition(),
                offset=message.offset(),
                timestamp_ms=message.timestamp()[1],
                key=message.key(),
                value=message.value(),
                headers=headers,
                failure=failure,
                decoded=decoded,
                site=site,
                resource_type=resource_type,
                target_ref=dead_letter_ref(config, item),
                resolution=done.get(letter_id),
            )
        )
    return letters


def _site_and_type(config: Config, decoded: Any, failure: FailureInfo | None) -> tuple[str, str]:
    if isinstance(decoded, dict) and "_schema" in decoded:
        return str(decoded.get("site") or ""), str(decoded.get("resource_type") or "")
    site = ""
    if failure is not None:
        try:
            site = config.site_of_topic(failure.origin_topic).site
        except KeyError:  # not a site's source topic: an audit event the audit store could not store, say
            site = ""
    row = (decoded.get("after") or decoded.get("before")) if isinstance(decoded, dict) else None
    if row is None and isinstance(decoded, dict):  # an audit event names its site and resource type itself
        return str(decoded.get("site") or site), str(decoded.get("resource_type") or "")
    resource_type = str(row.get("resource_type") or "") if isinstance(row, dict) else ""
    return site, resource_type


def counts_by_reason(letters: Iterable[DeadLetter]) -> list[tuple[tuple[str, str], int]]:
    """(stage, error class) → how many, most first."""
    counter = Counter((lt.failure.stage, lt.failure.error_class) if lt.failure else ("?", "?") for lt in letters)
    return counter.most_common()


def redacted(letter: DeadLetter, with_patient_data: bool) -> dict[str, Any]:
    """The dead letter for `show`: clinical content only when asked for."""
    value = letter.decoded
    if not with_patient_data and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in ("resource", "before", "after", "payload", "_base64")}
        value["content"] = "<withheld: may hold patient data; add --with-patient-data>"
    return {
        **letter.summary(),
        "key": (letter.key or b"").decode("utf-8", "replace") if with_patient_data else "<withheld>",
        "failure": letter.failure.__dict__ if letter.failure else None,
        "resolution": letter.resolution,
        "value": value,
    }


def destination(config: Config, letter: DeadLetter) -> str:
    """The topic a replay goes to: the input of the stage that failed it."""
    if letter.failure is None:
        raise CdrsyncError(f"dead letter {letter.id} has no failure headers: cannot tell where it came from")
    if letter.failure.stage not in STAGE_INPUT:
        raise CdrsyncError(f"dead letter {letter.id} failed at stage {letter.failure.stage!r}, which has no replay")
    key = STAGE_INPUT[letter.failure.stage]
    return letter.failure.origin_topic if key is None else config.topics.name(key)


def resolve(
    bootstrap: str,
    config: Config,
    letters: list[DeadLetter],
    action: str,
    *,
    reason: str = "",
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Replay or discard dead letters; each is sent, acknowledged, recorded and audited. How many were done."""
    producer = AcknowledgedProducer(bootstrap)
    operator = operator_name()

    def send(letter: DeadLetter, report: Callable[[Any, Any], None]) -> None:
        assert letter.failure is not None
        headers: list[tuple[str, str | bytes | None]] = [
            *failure_headers(FailureInfo(**{**letter.failure.__dict__, "tier": -1})),
            (REPLAY_HEADER, letter.id.encode()),
        ]
        topic = destination(config, letter) if action == "replay" else config.topics.name("ready")
        # Into the partition it failed in: the sink's per-resource state for it lives there.
        where: dict[str, Any] = (
            {"partition": letter.failure.origin_partition} if topic == letter.failure.origin_topic else {}
        )
        if action == "discard":
            if letter.failure.stage != "sink":
                return  # nothing waits behind it
            headers.append((DISCARD_HEADER, reason.encode() or b"1"))  # release the versions waiting behind it
        producer.producer.produce(topic, letter.value, letter.key, headers=headers, on_delivery=report, **where)

    def record(letter: DeadLetter) -> None:
        at_ms = int(time.time() * 1000)
        resolution = {
            "action": "replayed" if action == "replay" else "discarded",
            "at": iso_time(at_ms),
            "by": operator,
        }
        if reason:
            resolution["reason"] = reason
        producer.produce(config.topics.name("dlq_resolved"), orjson.dumps(resolution), letter.id.encode())
        audit = _audit(letter, resolution["action"], at_ms, operator, reason)
        producer.produce(config.topics.name("audit"), orjson.dumps(audit), letter.id.encode())

    return producer.send_then_record(letters, send, record, lambda letter: f"the {action} of {letter.id}", progress)


def operator_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _audit(letter: DeadLetter, step: str, at_ms: int, operator: str, reason: str) -> dict[str, Any]:
    f = letter.failure
    value = letter.decoded if isinstance(letter.decoded, dict) else {}
    detail = f"dead letter {letter.id} {step} by {operator}" + (f": {reason}" if reason else "")
    return {
        "at_ms": at_ms,
        "step": step,
        "site": letter.site or "unknown",
        "target": value.get("target"),
        "resource_type": letter.resource_type or "unknown",
        "source_id": str(value.get("source_id") or (letter.target_ref or "unknown")),
        "target_id": (letter.target_ref or "").partition("/")[2] or None,
        "source_lsn": value.get("source_lsn"),
        "source_commit_ms": value.get("source_commit_ms"),
        "origin": f"{f.origin_topic}[{f.origin_partition}]@{f.origin_offset}" if f else letter.id,
        "content_hash": value.get("content_hash"),
        "trigger": "operator",
        "detail": detail[:500],
    }
