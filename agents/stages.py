"""One agent per stage. Each is a short loop: decode, call one `pipeline` function, route the result.

Every agent runs with concurrency=1 (tables, and in-order commits) and never lets an exception
escape: Faust would ack the message that raised, and it would be lost.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from faust.types import EventT, StreamT

from pipeline import identity
from pipeline.deadletter import failure_headers, failure_info, parse_failure_headers
from pipeline.errors import MappingError, PermanentError, RetryableError, VersionConflictError
from pipeline.fhirclient import FhirClient
from pipeline.merge import merge_patient
from pipeline.metrics import CONFLICTS as CONFLICT_RECORDS
from pipeline.metrics import (
    DEAD_LETTERS,
    END_TO_END_LATENCY,
    HELD,
    HELD_RELEASED,
    IDENTITY_REVIEWS,
    LAST_SUCCESS,
    NORMALIZED,
    PARKED,
    WRITES,
)
from pipeline.normalize import SourcePosition
from pipeline.normalize import normalize_changes as normalize_batch
from pipeline.observe import record_fields
from pipeline.ordering import OrderState, expire_parked, order_record, staged, staged_tables
from pipeline.records import NormalizedResource, RoutedResource, decode, encode
from pipeline.sink import RetryPolicy, write_with_retries
from pipeline.staging import Staged

from .app import app, config, settings
from .audit import emit_audit
from .routing import apply_tables, dead_letter, deliver, headers_of, now_ms, origin_of, retry_later
from .topics import (
    conflicts,
    dead_letters,
    held_by_local_patient,
    held_records,
    identified,
    identity_review,
    normalized,
    parked_by_reference,
    patient_key_by_local_patient,
    patient_sources_by_patient_key,
    ready,
    referrers_by_reference,
    released_by_reference,
    retry_tiers,
    source_changes,
    waiting_by_reference,
)

log = logging.getLogger("cdrsync.stages")
TICK_HEADER = "cdrsync-tick"
_order_state = OrderState(released_by_reference, parked_by_reference, waiting_by_reference, referrers_by_reference)
_clients: dict[str, FhirClient] = {}


@app.agent(source_changes, concurrency=1)
async def normalize_changes(stream: StreamT) -> None:
    """Debezium change → validated FHIR resources on the normalized topic (one per fhir row, many per
    openEHR composition or HL7 v2 message); parts that cannot be mapped → one dead letter naming them."""
    async for event in stream.events():
        message = event.message
        try:
            site = config.site_of_topic(message.topic)
            batch = normalize_batch(site, message.value, SourcePosition(*origin_of(event)))
        except PermanentError as error:
            NORMALIZED.labels("unknown", "unknown", "failed").inc()
            await dead_letter("normalize", event, error)
            continue
        except Exception as error:  # a bug must not lose the record either
            log.exception("normalize failed unexpectedly at %s[%d]@%d", *origin_of(event))
            await dead_letter("normalize", event, error)
            continue
        if batch is None:
            NORMALIZED.labels(site.site, "", "tombstone").inc()
            continue
        for filtered in batch.filtered:
            NORMALIZED.labels(filtered.site, filtered.resource_type, "filtered").inc()
        for result in batch.records:
            NORMALIZED.labels(result.site, result.resource_type, "normalized").inc()
            # Keyed by site-local patient, so identity resolution sees one patient's changes in order.
            key = identity.local_patient(result) or f"{result.site}|{result.resource_type}/{result.source_id}"
            await deliver(normalized, key.encode(), encode(result))
        if batch.problems:
            # After the mapped records: a replay of this dead letter rewrites them under the same ids.
            NORMALIZED.labels(site.site, "", "failed").inc()
            reason = f"{len(batch.problems)} part(s) not mapped: " + "; ".join(batch.problems)
            await dead_letter("normalize", event, MappingError(reason))


@app.agent(normalized, concurrency=1)
async def resolve_identity(stream: StreamT) -> None:
    """Normalized resource → routed resources keyed by the global patient key, or held until it has one."""
    async for event in stream.events():
        state = identity.IdentityState(Staged(patient_key_by_local_patient), Staged(held_by_local_patient))
        try:
            record = decode(event.message.value, NormalizedResource)
            outcome = identity.resolve_identity(state, record, config.sites[record.site])
        except Exception as error:
            await dead_letter("identity", event, error)
            continue
        for held, reason in outcome.held:
            HELD.labels(held.site, held.resource_type).inc()
            log.warning("held %s/%s of %s: %s", held.resource_type, held.source_id, held.site, reason)
            await deliver(held_records, event.message.key, encode(held), [("cdrsync-reason", reason.encode())])
            await emit_audit("held", held, detail=reason)
        for item, reason in outcome.review:
            IDENTITY_REVIEWS.labels(item.site).inc()
            log.error("identity review for %s/%s of %s: %s", item.resource_type, item.source_id, item.site, reason)
            await deliver(identity_review, event.message.key, encode(item), [("cdrsync-reason", reason.encode())])
            await emit_audit("identity_review", item, detail=reason)
        for routed in outcome.routed:
            await deliver(identified, routed.patient_key.encode(), encode(routed))
        if outcome.released:
            HELD_RELEASED.labels(record.site).inc(outcome.released)
        for released in outcome.released_records:
            await emit_audit("released", released, detail="its patient's shared identifier arrived")
        assert isinstance(state.keys, Staged) and isinstance(state.held, Staged)
        await apply_tables(state.keys, state.held)  # only now: outputs are acknowledged


@app.agent(identified, concurrency=1)
async def order_resources(stream: StreamT) -> None:
    """Hold a resource until what it references is released; release in dependency order."""
    async for event in stream.events():
        if any(name == TICK_HEADER for name, _ in headers_of(event)):
            await _expire_parks(event.message.partition)
            continue
        changes = staged(_order_state)
        patients = Staged(patient_sources_by_patient_key)
        try:
            record = merge_patient(patients, decode(event.message.value, RoutedResource))
            releasable = order_record(changes, record, now_ms(), event.message.partition)
        except Exception as error:
            await dead_letter("order", event, error)
            continue
        if not releasable:
            PARKED.labels(record.site, record.resource_type).inc()
        for item in releasable:
            await deliver(ready, item.patient_key.encode(), encode(item))
        # Only now: the tables never claim a release Kafka has not acknowledged.
        await apply_tables(*staged_tables(changes), patients)


async def _expire_parks(partition: int) -> None:
    limit_ms = settings.park_limit_seconds * 1000
    changes = staged(_order_state)
    for parked in expire_parked(changes, now_ms(), limit_ms, partition):
        if parked.missing.startswith("~"):
            reason = f"{parked.missing[1:]} still references it at the target after {settings.park_limit_seconds}s"
        else:
            reason = f"waited {settings.park_limit_seconds}s for {parked.missing}, which never arrived"
        error = PermanentError(reason)
        error.error_class = "park_expired"
        await dead_letter_record("order", parked.record, error)
    await apply_tables(*staged_tables(changes))


async def dead_letter_record(stage: str, record: RoutedResource, error: PermanentError) -> None:
    """Dead-letter a record that is not the message being processed (an expired park)."""
    info = failure_info(
        stage,
        error,
        attempts=0,
        now_ms=now_ms(),
        origin=(record.origin_topic, record.origin_partition, record.origin_offset),
    )
    DEAD_LETTERS.labels(stage, record.site, record.target, info.error_class).inc()
    await deliver(dead_letters, record.patient_key.encode(), encode(record), failure_headers(info))


@app.timer(interval=60.0)
async def tick_order_partitions() -> None:
    """Let every order partition check its parks for expiry, even when no record arrives."""
    for partition in range(config.topics.partitions_of("identified")):
        await deliver(identified, TICK_HEADER.encode(), None, [(TICK_HEADER, b"1")], partition=partition)


def _client(target: str) -> FhirClient:
    if target not in _clients:
        _clients[target] = FhirClient(config.target(target))
    return _clients[target]


async def _write(event_record: RoutedResource, attempts: int) -> None:
    """Write one record; raise what the target's answer means."""
    client, policy = _client(event_record.target), RetryPolicy(attempts)
    # No version table yet (versions=None): kept in a Faust table written by this agent, it made the
    # SIGKILL test lose a record (branch wip/conflicts-sink-table), so If-Match is not used until fixed.
    outcome, used = await write_with_retries(client, event_record, policy, None)
    labels = (event_record.site, event_record.target, event_record.resource_type)
    WRITES.labels(*labels, "succeeded", "").inc()
    END_TO_END_LATENCY.labels(*labels).observe(max(0.0, time.time() - event_record.source_commit_ms / 1000))
    LAST_SUCCESS.labels(event_record.site, event_record.target).set(time.time())
    await emit_audit(
        "written", event_record, detail=f"{event_record.op} status {outcome.status} version {outcome.version_id}"
    )
    log.info(
        "wrote %s %s to %s (status %d, version %s, attempts %d)",
        event_record.op,
        event_record.target_ref,
        event_record.target,
        outcome.status,
        outcome.version_id,
        used,
        extra={**record_fields(event_record), "status": outcome.status, "attempts": used, "op": event_record.op},
    )


async def _write_or_route(stage: str, event: EventT, attempts: int) -> None:
    try:
        record = decode(event.message.value, RoutedResource)
    except PermanentError as error:
        await dead_letter(stage, event, error)
        return
    labels = (record.site, record.target, record.resource_type, "failed")
    try:
        await _write(record, attempts)
    except VersionConflictError as conflict:
        WRITES.labels(*labels, conflict.error_class).inc()
        await _report_conflict(event, record, conflict)
    except RetryableError as error:
        WRITES.labels(*labels, error.error_class).inc()
        await retry_later(stage, event, error, attempts)
    except PermanentError as error:
        WRITES.labels(*labels, error.error_class).inc()
        await dead_letter(stage, event, error, attempts)
        await emit_audit("dead_lettered", record, detail=f"{error.error_class}: {error}"[:500])
    except Exception as error:
        WRITES.labels(*labels, "internal").inc()
        log.exception("sink failed unexpectedly at %s[%d]@%d", *origin_of(event))
        await dead_letter(stage, event, error, attempts)


async def _report_conflict(event: EventT, record: RoutedResource, conflict: VersionConflictError) -> None:
    """Keep both versions for clinical review; the target keeps its own (DESIGN.md decision 8)."""
    CONFLICT_RECORDS.labels(record.site, record.target, record.resource_type).inc()
    await emit_audit("conflict", record, detail=str(conflict)[:500])
    log.error("conflict: %s at %s changed since our last write; change not applied", record.target_ref, record.target)
    value = {
        "target": record.target,
        "target_ref": record.target_ref,
        "site": record.site,
        "source_id": record.source_id,
        "source_version": record.source_version,
        "detected_ms": now_ms(),
        "reason": str(conflict),
        "incoming": orjson.loads(record.resource) if record.resource else None,
        "current": conflict.current,
        "origin": {"topic": record.origin_topic, "partition": record.origin_partition, "offset": record.origin_offset},
    }
    await deliver(conflicts, event.message.key, orjson.dumps(value))


@app.agent(ready, concurrency=1)
async def write_resources(stream: StreamT) -> None:
    """Write each ready resource to its target; commit only after the target acknowledged."""
    async for event in stream.events():
        await _write_or_route("sink", event, settings.sink_attempts)


def _retry_agent(tier_index: int) -> None:
    async def retry_writes(stream: StreamT) -> None:
        async for event in stream.events():
            info = parse_failure_headers(headers_of(event))
            wait_ms = (info.due_ms if info else 0) - now_ms()
            if wait_ms > 0:
                await asyncio.sleep(wait_ms / 1000)
            await _write_or_route("sink", event, settings.sink_attempts)

    app.agent(retry_tiers[tier_index], name=f"retry_writes_tier{tier_index}", concurrency=1)(retry_writes)


for _index in range(len(retry_tiers)):
    _retry_agent(_index)
