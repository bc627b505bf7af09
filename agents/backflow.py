"""Back-flow wiring: central's changes → one record per contributing hospital → written into that hospital.

`route_back` runs inside the order stage (it needs `patient_sources_by_patient_key`, partitioned like it);
`write_back` writes each record into the hospital's own source table (or its FHIR endpoint), with short
retries, in one lane per hospital (_Lanes). While a hospital cannot be reached its lane holds (circuit
breaker, alert TargetUnreachable with the hospital as target) and the other hospitals' lanes go on, up to
CDRSYNC_WRITEBACK_HOLD_SECONDS, so that a long outage does not fill the lane; then, and for a failure of
the record itself, the dead-letter topic: nothing is dropped silently, and a replayed dead letter never
replaces a newer version.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import psycopg
from faust.types import EventT, StreamT
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from pipeline.acks import InOrderAcks
from pipeline.backflow import central_supersedes, suppressed_routes, write_back_records, write_fhir_copy
from pipeline.breaker import CircuitBreaker, HoldAbandoned
from pipeline.config import SiteConfig
from pipeline.errors import PermanentError, RetryableError, TargetUnavailableError
from pipeline.fhirclient import FhirClient
from pipeline.flowmetrics import BACKFLOW, WRITEBACK_WAITING
from pipeline.hospitaltable import WriteBackSetupError, connect, write_table_copy
from pipeline.observe import record_fields
from pipeline.records import NormalizedResource, RoutedResource, decode, encode
from pipeline.staging import current

from .app import app, config, settings
from .audit import emit_audit
from .holding import breaker, exit_holding, hold_interrupted
from .routing import dead_letter, deliver, processing
from .topics import patient_sources_by_patient_key

__all__ = ["copy_key", "report_echoes", "route_back", "write_back", "writeback_topic"]

log = logging.getLogger("cdrsync.backflow")
writeback_topic = app.topic(config.topics.name("writeback"), partitions=config.topics.partitions_of("writeback"))
_connections: dict[str, psycopg.AsyncConnection[Any]] = {}
_clients: dict[str, FhirClient] = {}
# Hospitals whose hold ran out and that have not answered since, each probed until it answers (_watch).
_unreachable: dict[str, asyncio.Future[None]] = {}
_CONNECT_TIMEOUT_SECONDS = 10
_EXIT_WRITEBACK_BUG = 71  # as the sink's: a bug, not an outage


class NoHospitalError(PermanentError):
    """A central change about a patient no hospital sent (or whose local id is unknown)."""

    error_class = "no_hospital"


async def route_back(event: EventT, record: RoutedResource) -> None:
    """Send a central change to every hospital that contributed to its patient; dead-letter what cannot go."""
    outcome = write_back_records(config, current(patient_sources_by_patient_key), record)
    for item in outcome.records:
        await deliver(writeback_topic, copy_key(item), encode(item))
    if outcome.missing or not outcome.records:
        BACKFLOW.labels(record.site, "", record.resource_type, "no_hospital").inc()
        if record.is_delete and not outcome.missing:
            # Nothing of it can be at any hospital (its patient's are none): a deletion has nothing to do. (A board
            # correcting a decision's patient sends one for the patient it named before, pipeline/normalize.py.)
            log.info("%s deleted at %s: no hospital holds a copy", record.target_ref, record.site)
            return
        why = f"no local patient id for {outcome.missing}" if outcome.missing else "no hospital sent this patient"
        await dead_letter("backflow", event, NoHospitalError(f"{record.resource_type}/{record.source_id}: {why}"))


def copy_key(record: RoutedResource) -> bytes:
    """The write-back topic's key: one hospital's copy of one central resource, whatever patient it names.

    All versions of a copy meet in one partition, so one lane writes them in turn. Keyed by patient, a decision
    the board moved to another patient had its deletion under the previous patient (pipeline/normalize.py
    `_withdrawn`) and its new version in two partitions, perhaps two workers: a FHIR endpoint's delete (HAPI
    ignores If-Match on DELETE) could then take the new version with it."""
    return f"{record.target}|{record.target_ref}".encode()


async def report_echoes(record: NormalizedResource) -> None:
    """Count and audit a hospital change not sent to a target because cdrsync wrote it there from that target."""
    site = config.sites.get(record.site)
    for target in suppressed_routes(record, site) if site is not None else []:
        BACKFLOW.labels(record.site, target, record.resource_type, "echo_suppressed").inc()
        await emit_audit("echo_suppressed", record, trigger="backflow", detail=f"written here by cdrsync from {target}")


def _dsn(site: SiteConfig) -> str:
    assert site.source is not None and site.writeback is not None
    return settings.pg_dsn(
        site.source.database,
        host=site.writeback.host,
        port=site.writeback.port,
        connect_timeout=_CONNECT_TIMEOUT_SECONDS,
    )


async def _connection(site: SiteConfig) -> psycopg.AsyncConnection[Any]:
    current = _connections.get(site.site)
    if current is None or current.closed:
        current = await connect(site.site, _dsn(site), settings.pg_user)
        _connections[site.site] = current
    return current


async def _write_table(site: SiteConfig, record: RoutedResource) -> str:
    assert site.source is not None
    connection = await _connection(site)
    try:
        return await write_table_copy(connection, site.source.schema_name, site.source.table, record)
    except psycopg.OperationalError as exc:
        _connections.pop(site.site, None)
        raise TargetUnavailableError(f"{site.site} database: {type(exc).__name__}") from None


def _fhir_client(site: SiteConfig) -> FhirClient:
    assert site.writeback is not None
    if site.site not in _clients:
        _clients[site.site] = FhirClient(site.writeback.endpoint())
    return _clients[site.site]


async def _write_fhir(site: SiteConfig, record: RoutedResource) -> str:
    return await write_fhir_copy(_fhir_client(site), record)


def _central_client(site: str) -> FhirClient:
    """A client of the capturing site's own server (central), where a record's version is checked first."""
    key = f"capture|{site}"
    if key not in _clients:
        _clients[key] = FhirClient(config.target(site))
    return _clients[key]


async def _write_copy(site: SiteConfig, record: RoutedResource) -> str:
    """Write the copy, unless central has moved on from the record's version since (`central_supersedes`)."""
    try:
        superseded = await central_supersedes(_central_client(record.site), record)
    except TargetUnavailableError as error:
        raise TargetUnavailableError(f"{record.site} did not answer the version check: {error}") from None
    if superseded is not None:
        return superseded
    return await (_write_fhir(site, record) if _by_fhir(site) else _write_table(site, record))


def _by_fhir(site: SiteConfig) -> bool:
    return site.writeback is not None and site.writeback.method == "fhir"


async def _probe(site: SiteConfig) -> int:
    """200 when the hospital's database answers a query (or its FHIR endpoint its metadata), 0 when it does not."""
    if _by_fhir(site):
        return await _fhir_client(site).probe()
    try:
        connection = await _connection(site)
        async with connection.cursor() as cursor:
            await cursor.execute("SELECT 1")
        return 200
    except (TargetUnavailableError, psycopg.OperationalError):
        _connections.pop(site.site, None)
        return 0
    except WriteBackSetupError:
        return 200  # it answers; what it lacks is the records' own failure (dead-lettered with the reason)


def _hospital(site: SiteConfig) -> CircuitBreaker:
    return breaker(site.site, lambda: _probe(site))


def _interrupted(retry_state: Any) -> bool:
    return hold_interrupted() is not None


async def _write_back_once(site: SiteConfig, record: RoutedResource, attempts: int) -> str:
    """Write with short retries (one try while the hospital is known to be unreachable)."""
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(attempts) | _interrupted,
        wait=wait_exponential_jitter(initial=0.5, max=8.0),
        retry=retry_if_exception_type(RetryableError),
        reraise=True,
    ):
        with attempt:
            return await _write_copy(site, record)
    raise AssertionError("unreachable: tenacity reraises the last error")  # pragma: no cover


async def _hold(site: SiteConfig, record: RoutedResource) -> str | None:
    """After a transient failure: hold while the hospital cannot be reached, up to CDRSYNC_WRITEBACK_HOLD_SECONDS.

    None: it answers again, write again. A reason: dead-letter the record with it (the hospital answers, so the
    failure is this record's; or the hold ran out, or had run out for an earlier record and it still does not
    answer). A hold that a rebalance or a stop interrupts ends the worker without acknowledging the record.
    """
    interrupted = hold_interrupted()
    if interrupted is not None:
        exit_holding(record, interrupted)
    hospital = _hospital(site)
    if not await hospital.target_down():
        return "the hospital answers; the write itself failed"
    if site.site in _unreachable:
        return f"{site.site} still unreachable; an earlier hold ran out after {settings.writeback_hold_seconds:.0f} s"
    limit, started = settings.writeback_hold_seconds, time.monotonic()

    def give_up() -> str | None:
        return hold_interrupted() or (f"held {limit:.0f} s" if time.monotonic() - started >= limit else None)

    try:
        await hospital.wait_until_reachable(give_up=give_up)
        return None
    except HoldAbandoned as abandoned:
        interrupted = hold_interrupted()
        if interrupted is not None:
            exit_holding(record, interrupted)
        _unreachable[site.site] = asyncio.ensure_future(_watch(site, hospital))
        log.error(
            "%s unreachable: gave up holding write-back after %s; its records go to the dead letters until it "
            "answers (replay them: cdrsync dlq replay --stage writeback --target %s --error-class target_unavailable)",
            site.site,
            abandoned,
            site.site,
        )
        return f"{site.site} unreachable, {abandoned}"


async def _watch(site: SiteConfig, hospital: CircuitBreaker) -> None:
    """Probe a hospital whose hold ran out until it answers, so its records hold again and its alert clears."""
    try:
        await hospital.wait_until_reachable()
    finally:
        _unreachable.pop(site.site, None)


async def _write_back(event: EventT, record: RoutedResource, site: SiteConfig) -> None:
    labels = (record.site, record.target, record.resource_type)
    while True:
        attempts = 1 if site.site in _unreachable else settings.sink_attempts
        try:
            result = await _write_back_once(site, record, attempts)
            break
        except RetryableError as error:
            reason = await _hold(site, record)
            if reason is None:
                continue
            failure: Exception = TargetUnavailableError(f"{record.target_ref} to {site.site}: {error}; {reason}")
        except Exception as error:  # permanent: dead letter with the reason
            failure = error
        BACKFLOW.labels(*labels, "failed").inc()
        await dead_letter("writeback", event, failure, attempts)  # audited there
        return
    _hospital(site).note_reachable()
    BACKFLOW.labels(*labels, "written_back").inc()
    await emit_audit("written_back", record, trigger="backflow", detail=result)
    log.info("wrote back %s to %s (%s)", record.target_ref, record.target, result, extra=record_fields(record))


class _Lanes:
    """One lane per hospital: its records written in the order read, each acknowledged once written (or
    dead-lettered). A hospital held while unreachable holds only its own lane; the others go on.

    Records finish out of order across lanes, and Faust commits the first run of acknowledged offsets even
    when it does not start at the oldest record (on a partition never committed), so each record is
    acknowledged only once every record before it in its partition is done (InOrderAcks): a held record
    keeps its partition's commit where it is, and after a restart the records behind it are read again and
    written again (a row whose content is unchanged is not rewritten, an older version never replaces a
    newer one). A lane takes at most CDRSYNC_WRITEBACK_LANE_RECORDS records ahead of what it has written;
    a full lane makes the stream wait, so a long outage cannot fill the worker's memory.
    """

    def __init__(self, stream: StreamT, capacity: int) -> None:
        self.acks: InOrderAcks[EventT] = InOrderAcks(lambda event: event.message.tp, stream.ack)
        self._capacity = capacity
        self._queues: dict[str, asyncio.Queue[tuple[EventT, RoutedResource]]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # kept: the event loop holds its tasks only weakly

    async def put(self, site: SiteConfig, event: EventT, record: RoutedResource) -> None:
        queue = self._queues.get(site.site)
        if queue is None:
            queue = self._queues[site.site] = asyncio.Queue(self._capacity)
            self._tasks[site.site] = asyncio.create_task(self._drain(site, queue), name=f"writeback-{site.site}")
        WRITEBACK_WAITING.labels(site.site).inc()
        await queue.put((event, record))

    async def _drain(self, site: SiteConfig, queue: asyncio.Queue[tuple[EventT, RoutedResource]]) -> None:
        while True:
            event, record = await queue.get()
            try:
                with processing(event):
                    await _write_back(event, record, site)
                await self.acks.done(event)
            except asyncio.CancelledError:  # the worker stops: what is not acknowledged is read again
                raise
            except Exception:  # a bug: acknowledging would lose the record, waiting would stall the hospital
                log.critical(
                    "write-back to %s failed unexpectedly; exiting without acknowledging", site.site, exc_info=True
                )
                os._exit(_EXIT_WRITEBACK_BUG)
            finally:
                WRITEBACK_WAITING.labels(site.site).dec()


@app.agent(writeback_topic, concurrency=1)
async def write_back(stream: StreamT) -> None:
    """Write central's decisions into each hospital, one lane per hospital (_Lanes); a record's offset is
    committed only after its hospital has it (or its dead letter is written)."""
    lanes = _Lanes(stream, settings.writeback_lane_records)
    stream.enable_acks = False  # each record is acknowledged by its lane
    async for event in stream.events():
        lanes.acks.track(event)
        try:
            record = decode(event.message.value, RoutedResource)
            site = config.sites.get(record.target)
            if site is None or site.writeback is None:
                raise PermanentError(f"{record.target_ref}: site {record.target!r} does not declare writeback")
        except PermanentError as error:
            with processing(event):
                await dead_letter("writeback", event, error)
            await lanes.acks.done(event)
            continue
        await lanes.put(site, event, record)
