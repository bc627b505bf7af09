"""Audit wiring: stages emit events to audit.v1; one agent stores them in PostgreSQL for ops to query."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import psycopg
from faust.types import StreamT

from pipeline.audit import AUDIT_TABLE_DDL, Step, audit_event, insert_events
from pipeline.records import NormalizedResource, RoutedResource

from .app import app, config, settings
from .routing import dead_letter, deliver

log = logging.getLogger("cdrsync.audit")
audit_topic = app.topic(config.topics.name("audit"))
_RECONNECT_SECONDS = 5.0


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
    """audit.v1 → audit.event; the record is acked only once its row is committed."""
    connection: psycopg.AsyncConnection[Any] | None = None
    async for event in stream.events():
        message = event.message
        while True:
            if connection is None or connection.closed:
                connection = await _connection()
            try:
                await insert_events(connection, [(message.topic, message.partition, message.offset, message.value)])
                break
            except psycopg.OperationalError:
                log.error("audit insert failed; reconnecting")
                connection = None
            except (psycopg.DataError, ValueError, KeyError) as error:  # our own record, malformed: a bug
                await dead_letter("audit", event, error)
                break
