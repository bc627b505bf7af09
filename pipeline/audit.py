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

from .records import NormalizedResource, RoutedResource

__all__ = ["AUDIT_TABLE_DDL", "Step", "audit_event", "insert_events"]

Step = Literal[
    "written",
    "held",
    "released",
    "conflict",
    "conflict_resolved",
    "dead_lettered",
    "retried",
    "identity_review",
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
        "detail": detail,
    }


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
