"""Audit events (DESIGN.md decision 9): one per sync step, on audit.v1 and in a PostgreSQL table.

An event says what happened (step), when, to which resource (site, target, type, ids), where the change
came from (source LSN, Kafka origin), what was sent (SHA-256 of the canonical JSON) and why (trigger).
No patient data: ids and hashes only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

import orjson

from .errors import CdrsyncError
from .logs import scrub
from .records import NormalizedResource, RoutedResource, decode_resource

__all__ = ["AUDIT_TABLE_DDL", "Step", "audit_event", "failure_event", "insert_events"]

Step = Literal[
    "written",
    "held",
    "released",
    "conflict",
    "conflict_resolved",
    "dead_lettered",
    "retried",
    "identity_review",
    "identity_decided",
    "identity_not_applied",
    "identity_move",
    "held_behind",
    "duplicate_skipped",
    "discarded",
    "replayed",
    # trigger and back-flow (pipeline/trigger.py, pipeline/backflow.py)
    "trigger_held",
    "backfilled",
    "written_back",
    "echo_suppressed",
]

AUDIT_TABLE_DDL = """
CREATE SCHEMA IF NOT EXISTS audit;
CREATE TABLE IF NOT EXISTS audit.event (
  kafka_topic     text        NOT NULL,
  kafka_partition integer     NOT NULL,
  kafka_offset    bigint      NOT NULL,
  at              timestamptz NOT NULL,
  step            text        NOT NULL,
  site            text        NOT NULL,
  target          text,
  resource_type   text        NOT NULL,
  source_id       text        NOT NULL,
  target_id       text,
  source_lsn      bigint,
  source_commit   timestamptz,
  origin          text        NOT NULL,
  content_hash    text,
  trigger         text        NOT NULL,
  detail          text,
  PRIMARY KEY (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX IF NOT EXISTS event_resource ON audit.event (resource_type, target_id);
CREATE INDEX IF NOT EXISTS event_at ON audit.event (at);
"""


def audit_event(
    step: Step,
    record: NormalizedResource | RoutedResource,
    *,
    trigger: str = "all",
    detail: str | None = None,
    at_ms: int | None = None,
) -> dict[str, Any]:
    """The audit event of one step of one record."""
    target, target_id = (record.target, record.target_id) if isinstance(record, RoutedResource) else (None, None)
    return {
        "at_ms": at_ms if at_ms is not None else int(time.time() * 1000),
        "step": step,
        "site": record.site,
        "target": target,
        "resource_type": record.resource_type,
        "source_id": record.source_id,
        "target_id": target_id,
        "source_lsn": record.source_lsn,
        "source_commit_ms": record.source_commit_ms,
        "origin": f"{record.origin_topic}[{record.origin_partition}]@{record.origin_offset}",
        "content_hash": record.content_hash,
        "trigger": trigger,
        "detail": _detail(detail),
    }


def _detail(text: str | None) -> str | None:
    """An event's detail as stored: what a FHIR server's diagnostics quote cut (pipeline/logs.py scrub: a name,
    a birth date), at most 500 characters. The dead letter itself keeps the whole message, for ops."""
    return scrub(text, quoted=True)[:500] if text else text


def failure_event(
    step: Step,
    value: bytes | None,
    origin: tuple[str, int, int],
    *,
    site: str,
    detail: str,
    trigger: str = "all",
    at_ms: int | None = None,
) -> dict[str, Any]:
    """The audit event of a record a stage could not pass on (dead-lettered, or sent to a retry tier), from
    the record as it was read from Kafka: one of cdrsync's own records names itself; a source change (a
    Debezium envelope) names the captured row's type and id where it has them; anything else is named by
    where it was read (`origin`) alone. `site` is what the caller knows of it (from the topic)."""
    try:
        record = decode_resource(value) if value else None
    except CdrsyncError:
        record = None
    if record is not None:
        return audit_event(step, record, trigger=trigger, detail=detail, at_ms=at_ms)
    topic, partition, offset = origin
    where = f"{topic}[{partition}]@{offset}"
    event: dict[str, Any] = {
        "at_ms": at_ms if at_ms is not None else int(time.time() * 1000),
        "step": step,
        "site": site,
        "target": None,
        "resource_type": "",
        "source_id": where,
        "target_id": None,
        "source_lsn": None,
        "source_commit_ms": None,
        "origin": where,
        "content_hash": None,
        "trigger": trigger,
        "detail": _detail(detail),
    }
    return {**event, **_source_row_fields(value)} if value else event


def _source_row_fields(value: bytes) -> dict[str, Any]:
    """What a Debezium change says of itself, where it is one: its row's resource_type and id, and the source
    LSN and commit time."""
    try:
        envelope = orjson.loads(value)
    except orjson.JSONDecodeError:
        return {}
    payload = envelope.get("payload", envelope) if isinstance(envelope, dict) else None
    row = (payload.get("after") or payload.get("before")) if isinstance(payload, dict) else None
    if not isinstance(row, dict):
        return {}
    fields: dict[str, Any] = {}
    if isinstance(row.get("resource_type"), str) and row["resource_type"]:
        fields["resource_type"] = row["resource_type"]
    row_id = next((row[k] for k in ("id", "uid") if row.get(k) not in (None, "")), None)  # fhir, hl7v2; openehr
    if row_id is not None:
        fields["source_id"] = str(row_id)
    source = payload.get("source") if isinstance(payload, dict) else None
    if isinstance(source, dict):
        if isinstance(source.get("lsn"), int):
            fields["source_lsn"] = source["lsn"]
        if isinstance(source.get("ts_ms"), int):
            fields["source_commit_ms"] = source["ts_ms"]
    return fields


def _row(topic: str, partition: int, offset: int, event: dict[str, Any]) -> tuple[Any, ...]:
    return (
        topic,
        partition,
        offset,
        event["at_ms"] / 1000,
        event["step"],
        event["site"],
        event["target"],
        event["resource_type"],
        event["source_id"],
        event["target_id"],
        event["source_lsn"],
        event["source_commit_ms"] / 1000 if event.get("source_commit_ms") else None,
        event["origin"],
        event["content_hash"],
        event["trigger"],
        event["detail"],
    )


_INSERT = (
    "INSERT INTO audit.event SELECT t, p::integer, o::bigint, to_timestamp(a::float8), s, si, tg, rt, sid, tid,"
    " lsn::bigint, to_timestamp(sc::float8), org, ch, tr, d"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
    " %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[])"
    " AS u(t, p, o, a, s, si, tg, rt, sid, tid, lsn, sc, org, ch, tr, d)"
    " ON CONFLICT DO NOTHING"
)


def insert_events(connection: Any, events: Iterable[tuple[str, int, int, bytes]]) -> int:
    """Insert (topic, partition, offset, JSON) audit records in one transaction (a psycopg connection); a
    replayed record is not inserted twice. A malformed record raises before anything is committed.

    One statement for the whole batch, the same text every time (a column of values per parameter, as text,
    cast by PostgreSQL): executemany sent a statement per record and pipelined them in Python, and a
    multi-row VALUES list was a new statement for psycopg to parse at every batch size."""
    rows = [_row(topic, partition, offset, orjson.loads(value)) for topic, partition, offset, value in events]
    if not rows:
        return 0
    columns = [[None if value is None else str(value) for value in column] for column in zip(*rows, strict=True)]
    with connection.cursor() as cursor:
        cursor.execute(_INSERT, columns)
    connection.commit()
    return len(rows)
