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


_ROW = "(%s, %s, %s, to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), %s, %s, %s, %s)"
_ROWS_PER_STATEMENT = 2000  # 32 000 parameters; PostgreSQL takes at most 65 535 in one statement


def insert_events(connection: Any, events: Iterable[tuple[str, int, int, bytes]]) -> int:
    """Insert (topic, partition, offset, JSON) audit records in one transaction (a psycopg connection); a
    replayed record is not inserted twice. A malformed record raises before anything is committed.

    One multi-row INSERT per 2 000 records: executemany sent a statement per record, and its pipelining in
    Python cost the worker more CPU than the rows themselves."""
    rows = [_row(topic, partition, offset, orjson.loads(value)) for topic, partition, offset, value in events]
    if not rows:
        return 0
    with connection.cursor() as cursor:
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = rows[start : start + _ROWS_PER_STATEMENT]
            values = ", ".join([_ROW] * len(chunk))
            cursor.execute(
                f"INSERT INTO audit.event VALUES {values} ON CONFLICT DO NOTHING",
                [value for row in chunk for value in row],
            )
    connection.commit()
    return len(rows)
