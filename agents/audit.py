"""Audit wiring: stages emit events to audit.v1; one agent stores them in PostgreSQL for ops to query."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import psycopg
from faust.types import EventT, StreamT

from pipeline.audit import AUDIT_TABLE_DDL, Step, audit_event, insert_events
from pipeline.records import NormalizedResource, RoutedResource

from .app import app, config, settings
from .batches import take_batches
from .routing import batched, dead_letter, deliver

log = logging.getLogger("cdrsync.audit")
audit_topic = app.topic(config.topics.name("audit"))
_RECONNECT_SECONDS = 5.0
_MALFORMED = (psycopg.DataError, ValueError, KeyError, TypeError)  # our own record, malformed: a bug


async def emit_audit(step: Step, record: NormalizedResource | RoutedResource, **fields: Any) -> None:
    """Send one audit event and wait for Kafka's acknowledgement."""
    key = (getattr(record, "target_id", "") or record.source_id).encode()
    await deliver(audit_topic, key, orjson.dumps(audit_event(step, record, **fields)))


def _dsn() -> str:
    secret = f" password={settings.pg_password_value}" if settings.pg_password_value else ""
    where = f"host={settings.pg_host} port={settings.pg_port} user={settings.pg_user}"
    return f"{where} dbname={settings.audit_database}{secret}"


async def _connection() -> psycopg.AsyncConnection[Any]:
    """Connect (and create the table), retrying while PostgreSQL is away: audit waits, Kafka keeps it."""
    while True:
        try:
            connection = await psycopg.AsyncConnection.connect(_dsn())
            async with connection.cursor() as cursor:
                await cursor.execute(AUDIT_TABLE_DDL)
            await connection.commit()
            return connection
        except psycopg.Error as error:
            log.error("audit database unreachable (%s); retrying in %.0fs", type(error).__name__, _RECONNECT_SECONDS)
            await asyncio.sleep(_RECONNECT_SECONDS)


@app.agent(audit_topic, concurrency=1)
async def store_audit_events(stream: StreamT) -> None:
    """audit.v1 → audit.event, a batch at a time (one insert, one commit): Faust acknowledges a batch
    only once its rows are committed (agents/routing.py batched)."""
    connection: psycopg.AsyncConnection[Any] | None = None
    async for events in take_batches(
        stream,
        settings.stage_batch_max,
        settings.stage_batch_seconds,
        close_early=settings.batch_close_early,
        stage="audit",
    ):
        async with batched(len(events)):
            connection = await _store(connection, events)


async def _store(connection: psycopg.AsyncConnection[Any] | None, events: list[EventT]) -> psycopg.AsyncConnection[Any]:
    """Insert the batch's rows, reconnecting while PostgreSQL is away (Kafka keeps the events meanwhile)."""
    while True:
        if connection is None or connection.closed:
            connection = await _connection()
        try:
            await _insert(connection, events)
            return connection
        except psycopg.OperationalError:
            log.error("audit insert failed; reconnecting")
            connection = None


async def _insert(connection: psycopg.AsyncConnection[Any], events: list[EventT]) -> None:
    """All rows in one transaction; if one is malformed (our own record: a bug), each is inserted alone
    and the malformed ones are dead-lettered with the reason."""
    try:
        await insert_events(connection, [_row_of(event) for event in events])
        return
    except _MALFORMED:
        await connection.rollback()
    for event in events:
        try:
            await insert_events(connection, [_row_of(event)])
        except _MALFORMED as error:
            await connection.rollback()
            await dead_letter("audit", event, error)


def _row_of(event: EventT) -> tuple[str, int, int, bytes]:
    message = event.message
    return message.topic, message.partition, message.offset, message.value
