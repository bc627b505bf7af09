"""Back-flow wiring: central's changes → one record per contributing hospital → written into that hospital.

`route_back` runs inside the order stage (it needs `patient_sources_by_patient_key`, partitioned like it);
`write_back` writes each record into the hospital's own source table (or its FHIR endpoint), with short
retries, then the dead-letter topic: nothing is dropped silently.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from faust.types import EventT, StreamT
from psycopg import sql
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline.backflow import suppressed_routes, write_back_records
from pipeline.config import SiteConfig, TargetEndpoint
from pipeline.errors import PermanentError, RetryableError, TargetUnavailableError
from pipeline.fhirclient import FhirClient
from pipeline.flowmetrics import BACKFLOW
from pipeline.observe import record_fields
from pipeline.records import NormalizedResource, RoutedResource, decode, encode
from pipeline.staging import current

from .app import app, config, settings
from .audit import emit_audit
from .routing import dead_letter, deliver
from .topics import patient_sources_by_patient_key

__all__ = ["report_echoes", "route_back", "write_back", "writeback_topic"]

log = logging.getLogger("cdrsync.backflow")
writeback_topic = app.topic(config.topics.name("writeback"), partitions=config.topics.partitions_of("writeback"))
_connections: dict[str, psycopg.AsyncConnection[Any]] = {}
_clients: dict[str, FhirClient] = {}


class NoHospitalError(PermanentError):
    """A central change about a patient no hospital sent (or whose local id is unknown)."""

    error_class = "no_hospital"


async def route_back(event: EventT, record: RoutedResource) -> None:
    """Send a central change to every hospital that contributed to its patient; dead-letter what cannot go."""
    outcome = write_back_records(config, current(patient_sources_by_patient_key), record)
    for item in outcome.records:
        await deliver(writeback_topic, item.patient_key.encode(), encode(item))
    if outcome.missing or not outcome.records:
        BACKFLOW.labels(record.site, "", record.resource_type, "no_hospital").inc()
        why = f"no local patient id for {outcome.missing}" if outcome.missing else "no hospital sent this patient"
        await dead_letter("backflow", event, NoHospitalError(f"{record.resource_type}/{record.source_id}: {why}"))


async def report_echoes(record: NormalizedResource) -> None:
    """Count and audit a hospital change not sent to a target because cdrsync wrote it there from that target."""
    site = config.sites.get(record.site)
    for target in suppressed_routes(record, site) if site is not None else []:
        BACKFLOW.labels(record.site, target, record.resource_type, "echo_suppressed").inc()
        await emit_audit("echo_suppressed", record, trigger="backflow", detail=f"written here by cdrsync from {target}")


def _dsn(site: SiteConfig) -> str:
    assert site.source is not None
    secret = f" password={settings.pg_password_value}" if settings.pg_password_value else ""
    where = f"host={settings.pg_host} port={settings.pg_port} user={settings.pg_user}"
    return f"{where} dbname={site.source.database}{secret}"


async def _connection(site: SiteConfig) -> psycopg.AsyncConnection[Any]:
    current = _connections.get(site.site)
    if current is None or current.closed:
        try:
            current = await psycopg.AsyncConnection.connect(_dsn(site), autocommit=True)
        except psycopg.OperationalError as exc:
            raise TargetUnavailableError(f"{site.site} database: {type(exc).__name__}") from None
        _connections[site.site] = current
    return current


async def _write_table(site: SiteConfig, record: RoutedResource) -> str:
    """Upsert (or delete) the row in the hospital's source table; an unchanged row is not rewritten."""
    assert site.source is not None
    table = sql.Identifier(site.source.schema_name, site.source.table)
    connection = await _connection(site)
    try:
        async with connection.cursor() as cursor:
            if record.is_delete:
                query = sql.SQL("DELETE FROM {} WHERE resource_type = %s AND id = %s").format(table)
                await cursor.execute(query, (record.resource_type, record.target_id))
                return "deleted"
            query = sql.SQL(
                "INSERT INTO {t} AS r (resource_type, id, version, content) VALUES (%s, %s, 1, %s) "
                "ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
                "version = r.version + 1, updated_at = now() WHERE r.content IS DISTINCT FROM EXCLUDED.content"
            ).format(t=table)
            await cursor.execute(query, (record.resource_type, record.target_id, record.resource))
            return "upserted" if cursor.rowcount else "unchanged"
    except psycopg.OperationalError as exc:
        _connections.pop(site.site, None)
        raise TargetUnavailableError(f"{site.site} database: {type(exc).__name__}") from None


async def _write_fhir(site: SiteConfig, record: RoutedResource) -> str:
    assert site.writeback is not None and site.writeback.fhir_base_url is not None
    if site.site not in _clients:
        _clients[site.site] = FhirClient(TargetEndpoint(fhir_base_url=site.writeback.fhir_base_url))
    client = _clients[site.site]
    if record.is_delete:
        outcome = await client.delete(record.resource_type, record.target_id)
    else:
        assert record.resource is not None
        outcome = await client.put(record.resource_type, record.target_id, record.resource.encode())
    return f"status {outcome.status}"


async def _write_back_once(record: RoutedResource) -> str:
    site = config.sites[record.target]
    if site.writeback is not None and site.writeback.method == "fhir":
        return await _write_fhir(site, record)
    return await _write_table(site, record)


async def _write_back(event: EventT) -> None:
    try:
        record = decode(event.message.value, RoutedResource)
    except PermanentError as error:
        await dead_letter("writeback", event, error)
        return
    labels = (record.site, record.target, record.resource_type)
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(settings.sink_attempts),
            wait=wait_exponential_jitter(initial=0.5, max=8.0),
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        ):
            with attempt:
                result = await _write_back_once(record)
    except Exception as error:  # transient beyond the attempts, or permanent: dead letter with the reason
        BACKFLOW.labels(*labels, "failed").inc()
        await dead_letter("writeback", event, error, settings.sink_attempts)  # audited there
        return
    BACKFLOW.labels(*labels, "written_back").inc()
    await emit_audit("written_back", record, trigger="backflow", detail=result)
    log.info("wrote back %s to %s (%s)", record.target_ref, record.target, result, extra=record_fields(record))


@app.agent(writeback_topic, concurrency=1)
async def write_back(stream: StreamT) -> None:
    """Write central's decisions into each hospital; commit only after the hospital has it (or a dead letter)."""
    async for event in stream.events():
        await _write_back(event)
