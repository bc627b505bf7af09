"""One agent per stage. Each is a short loop: decode, call one `pipeline` function, route the result.

Every agent runs with concurrency=1 (tables, and in-order commits), takes its input in batches that
Faust acknowledges only once everything they produced is (agents/routing.py batched), and never lets
an exception escape: Faust would ack the message that raised, and it would be lost.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import orjson
from faust.types import EventT, StreamT

from pipeline import identity
from pipeline.backflow import captured_at_target, decided_at_central, flows_back
from pipeline.blocking import Outcome, Queued, SinkOrder, TargetVersions, write_in_order
from pipeline.breaker import CircuitBreaker, HoldAbandoned
from pipeline.conflicts import RESOLUTION_HEADER, conflict_record, parse_resolution
from pipeline.deadletter import DISCARD_HEADER, failure_info, kept_while_queued
from pipeline.errors import (
    CdrsyncError,
    EnvelopeError,
    MappingError,
    PermanentError,
    RetryableError,
    TargetUnavailableError,
    VersionConflictError,
)
from pipeline.fhirclient import FhirClient, WriteOutcome
from pipeline.merge import merge_patient
from pipeline.metrics import (
    BUNDLES,
    END_TO_END_LATENCY,
    HELD,
    HELD_BEHIND,
    HELD_RELEASED,
    IDENTITY_DECISIONS,
    IDENTITY_MOVES,
    IDENTITY_REVIEWS,
    LAST_SUCCESS,
    NORMALIZED,
    PARKED,
    WRITES,
)
from pipeline.metrics import CONFLICTS as CONFLICT_RECORDS
from pipeline.normalize import SourcePosition
from pipeline.normalize import normalize_changes as normalize_batch
from pipeline.observe import record_fields
from pipeline.ordering import (
    OrderState,
    ParkDeadlines,
    expire_parked,
    is_stale,
    older_message,
    order_record,
    staged,
    staged_tables,
)
from pipeline.patientmove import (
    MOVE,
    MoveOutcome,
    handover_notice,
    hold_for_handover,
    is_handover,
    lift_expired_barrier,
    move_site_records,
    moved_to,
    order_move,
    redirect,
    take_over,
)
from pipeline.provenance import runs_alongside
from pipeline.records import NormalizedResource, RoutedResource, decode, encode
from pipeline.sink import RetryPolicy, body_to_write, write_with_retries
from pipeline.staging import Staged, current, pending

from .app import app, config, settings
from .audit import emit_audit
from .backflow import report_echoes, route_back
from .batches import take_batches
from .holding import breaker, exit_holding, hold_interrupted
from .provenance import with_provenance
from .routing import (
    Carried,
    apply_tables,
    batched,
    dead_letter,
    dead_letter_info,
    deliver,
    headers_of,
    now_ms,
    origin_of,
    processing,
    retry_later,
)
from .topics import (
    blocked_by_reference,
    conflicts,
    held_by_local_patient,
    held_records,
    identified,
    identity_resolved,
    identity_review,
    normalized,
    parked_by_reference,
    patient_key_by_local_patient,
    patient_sources_by_patient_key,
    positions_by_reference,
    ready,
    referrers_by_reference,
    released_by_reference,
    source_changes,
    waiting_by_reference,
)
from .trigger import report_selection, select_for_route, staged_trigger_tables, trigger_states

log = logging.getLogger("cdrsync.stages")
TICK_HEADER = "cdrsync-tick"
_EXIT_SINK_BUG = 71
_park_deadlines = ParkDeadlines()
_order_state = OrderState(
    released_by_reference,
    parked_by_reference,
    waiting_by_reference,
    referrers_by_reference,
    positions_by_reference,
    _park_deadlines,
)
_clients: dict[str, FhirClient] = {}


async def _normalize_one(event: EventT) -> None:
    message = event.message
    try:
        site = config.site_of_topic(message.topic)
        position = SourcePosition(*origin_of(event))
        batch = normalize_batch(site, message.value, position, settings.max_record_bytes)
    except PermanentError as error:
        NORMALIZED.labels("unknown", "unknown", "failed").inc()
        await dead_letter("normalize", event, error)
        return
    except Exception as error:  # a bug must not lose the record either
        log.exception("normalize failed unexpectedly at %s[%d]@%d", *origin_of(event))
        await dead_letter("normalize", event, error)
        return
    if batch is None:
        NORMALIZED.labels(site.site, "", "tombstone").inc()
        return
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


async def _each_in_batches(stage: str, stream: StreamT, handle: Callable[[EventT], Awaitable[None]]) -> None:
    """A stage's loop: batches of its input (agents/routing.py batched), each record handled in order as
    Faust's current event."""
    async for events in take_batches(
        stream,
        settings.stage_batch_max,
        settings.stage_batch_seconds,
        close_early=settings.batch_close_early,
        stage=stage,
    ):
        async with batched(len(events)):
            for event in events:
                with processing(event):
                    await handle(event)


@app.agent(source_changes, concurrency=1)
async def normalize_changes(stream: StreamT) -> None:
    """Debezium change → validated FHIR resources on the normalized topic (one per fhir row, many per
    openEHR composition or HL7 v2 message); parts that cannot be mapped → one dead letter naming them."""
    await _each_in_batches("normalize", stream, _normalize_one)


async def _resolve_one(event: EventT) -> None:
    state = identity.IdentityState(Staged(patient_key_by_local_patient), Staged(held_by_local_patient))
    headers = headers_of(event)
    decided = identity.carries_decision(headers)  # `cdrsync identity accept|reject`
    try:
        record = decode(event.message.value, NormalizedResource)
        site = config.sites[record.site]
        if decided:
            outcome = await _decide(state, record, site, headers)
            if outcome is None:
                return
        else:
            outcome = identity.resolve_identity(state, record, site)
    except Exception as error:
        await dead_letter("identity", event, error)
        return
    await _deliver_identity(event.message.key, record, outcome)
    if not decided:
        await report_echoes(record)  # back-flow rows captured at a hospital are not sent back (agents/backflow.py)
    assert isinstance(state.keys, Staged) and isinstance(state.held, Staged)
    await apply_tables(state.keys, state.held)  # only now: outputs are acknowledged


async def _decide(
    state: identity.IdentityState, record: NormalizedResource, site: Any, headers: list[tuple[str, bytes]]
) -> identity.IdentityOutcome | None:
    """An operator's decision, applied; or refused and answered (None). Never a dead letter: a replay would send
    it without its header, as an old Patient version."""
    decision = None
    try:
        decision = identity.parse_decision(headers)
        assert decision is not None
        return identity.apply_decision(state, record, site, decision)
    except Exception as refused:  # stale, or malformed, or a bug: the held records stay held (tables not applied)
        if not isinstance(refused, identity.IdentityDecisionError | EnvelopeError):
            log.exception("identity decision could not be applied")
        await _decision_refused(record, decision, refused)
        return None


async def _deliver_identity(key: bytes | None, record: NormalizedResource, outcome: identity.IdentityOutcome) -> None:
    for held, reason in outcome.held:
        HELD.labels(held.site, held.resource_type).inc()
        log.warning("held %s/%s of %s: %s", held.resource_type, held.source_id, held.site, reason)
        await deliver(held_records, key, encode(held), [(identity.REASON_HEADER, reason.encode())])
        await emit_audit("held", held, detail=reason)
    for review in outcome.review:
        item, reason = review.record, review.reason
        IDENTITY_REVIEWS.labels(item.site).inc()
        log.error("identity review for %s/%s of %s: %s", item.resource_type, item.source_id, item.site, reason)
        await deliver(identity_review, key, encode(item), review.headers())
        await emit_audit("identity_review", item, detail=reason)
    for item, reason in outcome.not_applied:
        log.warning("not applied: %s/%s of %s: %s", item.resource_type, item.source_id, item.site, reason)
        await emit_audit("identity_not_applied", item, detail=reason)
    if outcome.closed is not None:
        await _review_closed(record, outcome.closed)
    for move in outcome.moves:  # first: the site's records at the new Patient wait for the MOVE's hand-over
        await deliver(identified, moved_to(move).encode(), encode(handover_notice(move)))
    for routed in outcome.routed:
        await deliver(identified, routed.patient_key.encode(), encode(routed))
    for move in outcome.moves:  # an accepted review: the site's records at the previous Patient follow
        log.warning("moving %s's records from Patient/%s to Patient/%s", move.site, move.target_id, moved_to(move))
        await deliver(identified, move.patient_key.encode(), encode(move))
        await emit_audit("identity_move", move, detail=f"requested: to Patient/{moved_to(move)}")
    if outcome.released:
        HELD_RELEASED.labels(record.site).inc(outcome.released)
    for released in outcome.released_records:
        await emit_audit("released", released, detail="its patient's shared identifier arrived")


async def _review_closed(record: NormalizedResource, closed: dict[str, Any]) -> None:
    """Record how a patient's identity review closed (`cdrsync identity list` reads it) and audit it."""
    closed = {**closed, "at_ms": now_ms()}
    IDENTITY_DECISIONS.labels(record.site, closed["action"]).inc()
    detail = (
        f"identity review {closed['review_number']} of {closed['local_patient']} {closed['action']} by "
        f"{closed['by']}: patient key {closed['previous_key']} -> {closed['key']}"
    )
    log.warning("%s", detail)  # the reviewer's reason is free text: kept in the audit trail, not in logs
    await deliver(identity_resolved, closed["local_patient"].encode(), orjson.dumps(closed))
    trigger = "operator" if closed["decided_ms"] is not None else "all"
    await emit_audit("identity_decided", record, detail=f"{detail} ({closed['reason']})"[:500], trigger=trigger)


async def _decision_refused(
    record: NormalizedResource, decision: identity.IdentityDecision | None, refused: Exception
) -> None:
    """Tell the operator who sent it (`cdrsync identity accept|reject` waits for this) and audit it."""
    local = identity.local_patient(record) or ""
    by = decision.by if decision else "unknown"
    log.error("identity decision by %s on %s refused: %s", by, local, refused)
    answer = {
        "local_patient": local,
        "action": "refused",
        "decided_ms": decision.at_ms if decision else None,
        "reason": str(refused),
    }
    await deliver(identity_resolved, identity.refusal_key(local, decision).encode(), orjson.dumps(answer))
    detail = f"{decision.action if decision else 'decision'} by {by} refused: {refused}"[:500]
    await emit_audit("identity_decided", record, detail=detail, trigger="operator")


@app.agent(normalized, concurrency=1)
async def resolve_identity(stream: StreamT) -> None:
    """Normalized resource → routed resources keyed by the global patient key, or held until it has one."""
    await _each_in_batches("identity", stream, _resolve_one)


async def _order_one(event: EventT) -> None:
    if any(name == TICK_HEADER for name, _ in headers_of(event)):
        await _expire_parks(event.message.partition)
        return
    changes = staged(_order_state)
    patients = Staged(patient_sources_by_patient_key)
    triggers = trigger_states()  # the route's trigger picks what is sent (agents/trigger.py)
    try:
        incoming = decode(event.message.value, RoutedResource)
        if flows_back(config, incoming.site):  # central's own change → its hospitals (agents/backflow.py)
            await route_back(event, incoming)
            return
        if is_stale(changes, incoming):
            await _skip_stale(incoming)
            return
        if (newer := older_message(changes, incoming, _inbox_row(incoming))) is not None:
            await _skip_older_message(incoming, newer)
            return
        selection = None
        redirected: list[RoutedResource] = []  # the site's records moved to another Patient (pipeline/patientmove.py)
        handover: list[RoutedResource] = []  # what this partition released of them, for the new Patient's partition
        stale: tuple[RoutedResource, ...] = ()  # what waited for a hand-over and was older than what it carried
        if is_handover(incoming):  # a MOVE's hand-over, in the partition of the Patient moved to
            releasable, redirected, handover, stale = take_over(
                changes, patients, incoming, now_ms(), event.message.partition
            )
        elif incoming.op == MOVE:  # not a change of a resource: an accepted identity review's move
            releasable, redirected, handover, _ = order_move(
                changes, patients, incoming, now_ms(), event.message.partition
            )
        elif (elsewhere := redirect(patients, incoming)) is not None:  # on its way here when its site's records moved
            releasable, redirected = [], [elsewhere]
        elif hold_for_handover(
            changes, patients, incoming, now_ms(), event.message.partition, settings.park_limit_seconds * 1000
        ):  # the site's records moved here and what the previous Patient released of them is not here yet
            releasable = []
            PARKED.labels(incoming.site, incoming.resource_type).inc()
        else:
            selection = select_for_route(triggers, incoming)
            releasable = []
            for chosen in selection.send:
                record = merge_patient(patients, chosen)
                released = order_record(changes, record, now_ms(), event.message.partition, _inbox_row(record))
                if not released:
                    PARKED.labels(record.site, record.resource_type).inc()
                for item in released:  # one parked here before its site's records moved goes after them
                    if (elsewhere := redirect(patients, item)) is None:
                        releasable.append(item)
                    else:
                        redirected.append(elsewhere)
    except Exception as error:
        await dead_letter("order", event, error)
        return
    for item in with_provenance(releasable):  # each central resource points at its source (agents/provenance.py)
        await deliver(ready, item.patient_key.encode(), encode(item))
    for item in handover:  # before the records sent on, which may need it
        await deliver(identified, item.patient_key.encode(), encode(item))
    if handover:
        log.info(
            "what the order stage knew of %s's resources at Patient/%s handed over to Patient/%s's partition (%d)",
            incoming.site,
            handover[0].target_id,
            handover[0].patient_key,
            len(handover),
            extra=record_fields(incoming),
        )
    for item in redirected:
        await _send_on(item)
    for item in stale:
        await _skip_stale(item)
    if selection is not None:
        await report_selection(incoming, selection)
    # Only now: the tables never claim a release Kafka has not acknowledged.
    await apply_tables(*staged_tables(changes), patients, *staged_trigger_tables(triggers))


async def _skip_stale(record: RoutedResource) -> None:
    """A change older than one of its row already seen (a Debezium re-send): not written; logged and audited."""
    log.warning(
        "%s from %s: source LSN %s is older than one already seen; a re-send, not written",
        record.target_ref,
        record.site,
        record.source_lsn,
        extra=record_fields(record),
    )
    await emit_audit("duplicate_skipped", record, detail=f"stale re-send, source LSN {record.source_lsn}")


def _inbox_row(record: RoutedResource) -> int | None:
    """The id of the HL7 v2 inbox row a change of a resource came from (the hospital's order of its messages,
    pipeline/ordering.py older_message); None for another source, and for what is not a change of content."""
    site = config.sites.get(record.site)
    if site is None or site.adapter != "hl7v2" or record.op not in ("CREATE", "UPDATE", "SNAPSHOT"):
        return None
    return record.source_version


async def _skip_older_message(record: RoutedResource, newer: int) -> None:
    """An HL7 v2 message older than one already applied to the resource (re-queued): not written; audited."""
    detail = f"older message (inbox row {record.source_version}) than one already applied (inbox row {newer})"
    log.warning(
        "%s from %s: %s; a re-queue, not written", record.target_ref, record.site, detail, extra=record_fields(record)
    )
    await emit_audit("duplicate_skipped", record, detail=detail)


async def _send_on(item: RoutedResource) -> None:
    """A record on its way to a Patient its site's records moved away from (pipeline/patientmove.py redirect),
    sent on to the new one, through its order stage."""
    IDENTITY_MOVES.labels(item.site, item.target, "redirected").inc()
    await deliver(identified, item.patient_key.encode(), encode(item))
    detail = f"redirected to Patient/{item.patient_key}: its site's records there moved after an identity review"
    await emit_audit("identity_move", item, detail=detail)


@app.agent(identified, concurrency=1)
async def order_resources(stream: StreamT) -> None:
    """Hold a resource until what it references is released; release in dependency order."""
    await _each_in_batches("order", stream, _order_one)


async def _expire_parks(partition: int) -> None:
    limit_ms = settings.park_limit_seconds * 1000
    if not _park_deadlines.built and not await _index_parks():
        return  # the next tick tries again; the parks stay in the table meanwhile
    changes = staged(_order_state)
    patients = Staged(patient_sources_by_patient_key)
    barriers: dict[str, str | None] = {}  # park key → the hand-over its records waited for (None: not one)
    try:
        for parked in expire_parked(changes, now_ms(), limit_ms, partition):
            if parked.missing not in barriers:
                barriers[parked.missing] = lift_expired_barrier(patients, parked.missing, now_ms(), limit_ms)
            if (awaited := barriers[parked.missing]) is not None:
                reason = f"waited {settings.park_limit_seconds}s for {awaited}, which never arrived"
            elif parked.missing.startswith("~"):
                reason = f"{parked.missing[1:]} still references it at the target after {settings.park_limit_seconds}s"
            else:
                reason = f"waited {settings.park_limit_seconds}s for {parked.missing}, which never arrived"
            error = PermanentError(reason)
            error.error_class = "park_expired"
            await dead_letter_record("order", parked.record, error)
        await apply_tables(*staged_tables(changes), patients)
    except BaseException:
        _park_deadlines.invalidate()  # the keys it handed out were not all expired: read them from the table again
        raise


async def _index_parks() -> bool:
    """Build the park deadlines from this worker's parked table (after a start or a rebalance)."""
    started = time.monotonic()
    parked = itertools.chain(
        parked_by_reference.items(),  # what is applied
        ((key, value) for key, value in pending(parked_by_reference) if value),  # and what this batch parked
    )
    try:
        built = await _park_deadlines.rebuild(parked)
    except Exception:  # a table being recovered or revoked during the scan
        _park_deadlines.invalidate()
        log.warning("parked records not indexed for expiry this time; the next check tries again", exc_info=True)
        return False
    if built:
        log.info("indexed %d parks for expiry in %.2fs", _park_deadlines.size, time.monotonic() - started)
    return built


@app.on_partitions_revoked.connect
async def _forget_park_deadlines_on_revoke(sender: Any, revoked: set[Any], **_: Any) -> None:
    _park_deadlines.invalidate()


@app.on_partitions_assigned.connect
async def _forget_park_deadlines_on_assign(sender: Any, assigned: set[Any], **_: Any) -> None:
    _park_deadlines.invalidate()  # another worker may have parked records in these partitions


async def dead_letter_record(stage: str, record: RoutedResource, error: PermanentError) -> None:
    """Dead-letter a record that is not the message being processed (an expired park)."""
    origin = (record.origin_topic, record.origin_partition, record.origin_offset)
    info = failure_info(stage, error, attempts=0, now_ms=now_ms(), origin=origin)
    await dead_letter_info(Carried(record.patient_key.encode(), encode(record), [], origin), info)


@app.timer(interval=60.0)
async def tick_order_partitions() -> None:
    """Let every order partition check its parks for expiry, even when no record arrives."""
    for partition in range(config.topics.partitions_of("identified")):
        await deliver(identified, TICK_HEADER.encode(), None, [(TICK_HEADER, b"1")], partition=partition)


def _client(target: str) -> FhirClient:
    if target not in _clients:
        _clients[target] = FhirClient(config.target(target))
    return _clients[target]


def _breaker(target: str) -> CircuitBreaker:
    return breaker(target, _client(target).probe)


# A write that waits for another one (a referenced resource the target lacks, a write another partition's sink
# owes) is tried twice in process, a second later: what it waits for is often a write of the same batch, another
# patient's, in flight (an identity move's new Patient); if not, it takes minutes or hours, and backing off in
# process for all CDRSYNC_SINK_ATTEMPTS would hold the sink's whole batch, every patient's, record after record.
# An unavailable target, which a moment may fix, gets every attempt.
_WAITING_ATTEMPTS = 2


async def _write(
    event_record: RoutedResource,
    attempts: int,
    versions: TargetVersions,
    prewritten: WriteOutcome | None = None,
    retry_on: tuple[type[Exception], ...] = (RetryableError,),
) -> None:
    """Write one record over the target version our last write got; raise what the target's answer means.

    prewritten: the record was already written, in a transaction bundle with others (_write_bundle);
    only what follows a write (version, metrics, audit) is left to do.
    """
    if prewritten is None:
        client = _client(event_record.target)
        policy = RetryPolicy(attempts, give_up=hold_interrupted, retry_on=retry_on, waiting_attempts=_WAITING_ATTEMPTS)
        writer = None
        if event_record.op == MOVE:  # the order stage's table (this partition's) says whether the patient came back
            here = current(patient_sources_by_patient_key).get(event_record.target_id) or {}
            writer = partial(move_site_records, returned=event_record.site in here.get("sites", []))
        outcome, used = await write_with_retries(client, event_record, policy, versions, writer)
    else:
        outcome, used = prewritten, 1
        if outcome.version_id is not None:
            versions[event_record.target_ref] = {"version": outcome.version_id}
    labels = (event_record.site, event_record.target, event_record.resource_type)
    WRITES.labels(*labels, "succeeded", "").inc()
    if event_record.op != MOVE:  # a move's origin is the Patient version reviewed, hours ago perhaps
        END_TO_END_LATENCY.labels(*labels).observe(max(0.0, time.time() - event_record.source_commit_ms / 1000))
    LAST_SUCCESS.labels(event_record.site, event_record.target).set(time.time())
    if isinstance(outcome, MoveOutcome):
        await _moved(event_record, outcome)
    else:
        detail = f"{event_record.op} status {outcome.status} version {outcome.version_id}"
        await emit_audit("written", event_record, detail=detail)
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


async def _moved(move: RoutedResource, outcome: MoveOutcome) -> None:
    """Audit a move done: how many resources moved, which of them had been edited at the target (their edit
    kept, and still told from cdrsync's writes, see pipeline/patientmove.py)."""
    IDENTITY_MOVES.labels(move.site, move.target, "moved").inc(len(outcome.moved))
    detail = f"moved {len(outcome.moved)} resource(s) to Patient/{outcome.to or moved_to(move)}"
    if outcome.to and outcome.to != moved_to(move):
        detail += f" (a later review took the patient on from Patient/{moved_to(move)})"
    if outcome.overtaken:
        IDENTITY_MOVES.labels(move.site, move.target, "overtaken").inc()
        detail = f"nothing moved: later reviews took the patient from Patient/{moved_to(move)} back to this one"
    if outcome.edited:
        detail += f"; edited at the target before, edit kept: {', '.join(outcome.edited)}"
    log.warning("%s of %s at Patient/%s: %s", move.target, move.site, move.target_id, detail)
    await emit_audit("identity_move", move, detail=f"done: {detail}"[:500])


async def _attempt(
    stage: str,
    carried: Carried,
    record: RoutedResource,
    attempts: int,
    versions: TargetVersions,
    prewritten: WriteOutcome | None = None,
) -> Outcome:
    """Write one record and route a failure: 'written', 'conflict', 'retrying' (a tier) or 'dead'.

    A transient failure while the target is unreachable holds here (circuit breaker) and tries again
    when it answers, so an outage does not push records through the tiers to the dead letters.
    """
    labels = (record.site, record.target, record.resource_type, "failed")
    # Back from a tier, only an unavailable target is retried in process: a write waiting for another one may go
    # round the last tier for hours, and each time it would hold the sink's batch for its retry. A replayed dead
    # letter (tier -1) is tried as a new record.
    from_tier = carried.failure is not None and carried.failure.tier >= 0
    retry_on: tuple[type[Exception], ...] = (TargetUnavailableError,) if from_tier else (RetryableError,)
    while True:
        try:
            await _write(record, attempts, versions, prewritten, retry_on)
            return "written"
        except VersionConflictError as conflict:
            WRITES.labels(*labels, conflict.error_class).inc()
            await _report_conflict(carried, record, conflict, versions.get(record.target_ref))
            return "conflict"
        except TargetUnavailableError as error:
            WRITES.labels(*labels, error.error_class).inc()
            target_breaker = _breaker(record.target)
            interrupted = hold_interrupted()
            if interrupted is not None:  # its retries were cut short for it: no probe (up to 30 s) either
                exit_holding(record, interrupted)
            if await target_breaker.target_down():
                try:
                    await target_breaker.wait_until_reachable(give_up=hold_interrupted)
                except HoldAbandoned as abandoned:
                    exit_holding(record, str(abandoned))
                continue
            return "retrying" if await retry_later(stage, carried, error, _made(error, attempts)) else "dead"
        except RetryableError as error:
            WRITES.labels(*labels, error.error_class).inc()
            return "retrying" if await retry_later(stage, carried, error, _made(error, attempts)) else "dead"
        except PermanentError as error:
            WRITES.labels(*labels, error.error_class).inc()
            await dead_letter(stage, carried, error, _made(error, attempts))  # audited there
            return "dead"
        except Exception as error:
            WRITES.labels(*labels, "internal").inc()
            log.exception("sink failed unexpectedly at %s[%d]@%d", *carried.origin)
            await dead_letter(stage, carried, error, _made(error, attempts))
            return "dead"


def _made(error: BaseException, default: int) -> int:
    """Attempts a failed write made (write_with_retries records them on the error)."""
    return int(getattr(error, "attempts_made", default) or default)


async def _sink(
    stage: str,
    event: EventT,
    attempts: int,
    prewritten: WriteOutcome | None = None,
    decoded: RoutedResource | None = None,
) -> None:
    """Write a ready record in per-resource order (pipeline/blocking.py), then release what waited behind it.

    prewritten: it was already written in a bundle (chosen by _bundle_candidate, so it is written now,
    not queued); the rest of its handling is the same. decoded: its value, decoded already.
    """
    with processing(event):  # its table changes go to its partition's changelog
        await _sink_one(stage, event, attempts, prewritten, decoded)


async def _sink_one(
    stage: str, event: EventT, attempts: int, prewritten: WriteOutcome | None, decoded: RoutedResource | None
) -> None:
    carried = Carried.of(event)
    try:
        record = decoded if decoded is not None else decode(event.message.value, RoutedResource)
    except PermanentError as error:
        if carried.discarded:
            # An operator discarded this dead letter (`cdrsync dlq discard`, audited there). It never decoded,
            # so it never reached the sink's table and nothing waits behind it: not a new dead letter.
            log.warning("discarded dead letter %s does not decode (%s): dropped", carried.identity, error)
            return
        await dead_letter(stage, carried, error)
        return
    order = SinkOrder(Staged(blocked_by_reference))
    ref, identity = record.target_ref, carried.identity
    versions = TargetVersions(order.table)
    try:
        decision = parse_resolution(carried.headers)
    except PermanentError as error:
        await dead_letter(stage, carried, error)
        return
    if decision is not None:  # `cdrsync conflicts resolve`: the reviewed target version becomes the base
        versions[ref] = {"version": decision[1]}
        order.decide(ref)
        log.warning("%s: conflict resolved (%s over target version %s)", ref, *decision, extra=record_fields(record))
        if decision[0] == "keep-target":
            await apply_tables(order.table)  # type: ignore[arg-type]
            return
    record, carried = _as_decided(order, record, carried)
    value = carried.value or b""
    group = (ref, *record.delete_with) if record.delete_with else ()
    route = order.route(ref, identity, group)
    if route == "duplicate":
        log.warning("%s of %s was already handled; this copy is not written again", identity, ref)
        await emit_audit("duplicate_skipped", record, detail=identity)
        return
    if route == "queue":
        queued = Queued(identity, carried.key, value, carried.origin, group, kept_while_queued(carried.headers))
        at, waiting = order.enqueue(ref, queued, now_ms())
        head = order.blocker(at)
        HELD_BEHIND.labels(record.site, record.target, record.resource_type).inc()
        behind = f"{head[0] if head else '?'} ({head[1] if head else '?'})" + (f" at {at}" if at != ref else "")
        detail = f"waits behind {behind}, {waiting} queued"
        log.warning("%s %s %s", ref, identity, detail)
        await emit_audit("held_behind", record, detail=detail)
        await apply_tables(order.table)  # type: ignore[arg-type]
        return
    discard = carried.discarded
    if discard:
        await emit_audit("discarded", record, detail=f"dead letter {identity} discarded by an operator")

    async def attempt(item: Queued, is_head: bool) -> Outcome:
        this = carried if is_head else Carried(item.key, item.value, list(item.headers), item.origin)
        version = record if is_head else decode(item.value, RoutedResource)  # the head is decoded above
        if not is_head:
            if this.discarded:  # discarded while it had to wait
                await emit_audit("discarded", version, detail=f"dead letter {item.identity} discarded by an operator")
                return "written"
            version, this = _as_decided(order, version, this)  # queued before a reviewer decided on it
        if not is_head or this.failure is not None:  # it waited (a retry tier, a dead letter, behind another)
            elsewhere = redirect(current(patient_sources_by_patient_key), version)
            if elsewhere is not None:  # meanwhile its site's records moved from this Patient to another
                await _send_on(elsewhere)
                return "written"
        row, at = f"{version.site}|{version.source_id}", version.target_ref  # at: a group's other member, too
        if order.superseded(at, row, version.source_lsn):  # read again after a crash: already overtaken
            await emit_audit("duplicate_skipped", version, detail=f"superseded, source LSN {version.source_lsn}")
            return "written"
        outcome = await _attempt(stage, this, version, attempts, versions, prewritten if is_head else None)
        if outcome in ("written", "conflict"):
            order.note_written(at, row, version.source_lsn)
        return outcome

    head = Queued(identity, carried.key, value, carried.origin, group)
    await write_in_order(order, ref, head, attempt, now_ms(), skip_head=discard)
    await apply_tables(order.table)  # type: ignore[arg-type]


def _as_decided(order: SinkOrder, record: RoutedResource, carried: Carried) -> tuple[RoutedResource, Carried]:
    """A version of a resource a reviewer decided on (SinkOrder.decided), as it is written: central's decision where
    those flow back (decided_at_central), its Kafka value rewritten too, so that a copy waiting in a queue or a
    retry tier (which keeps no decision header) is written the same way. Anything else as it is."""
    if not order.decided(record.target_ref):
        return record, carried
    decided = decided_at_central(config, record)
    if decided is record:
        return record, carried
    return decided, replace(carried, value=encode(decided))


async def _report_conflict(
    carried: Carried, record: RoutedResource, conflict: VersionConflictError, ours: dict[str, Any] | None
) -> None:
    """Keep both versions for clinical review; the target keeps its own (DESIGN.md decision 8)."""
    CONFLICT_RECORDS.labels(record.site, record.target, record.resource_type).inc()
    current_version = ((conflict.current or {}).get("meta") or {}).get("versionId")
    detail = f"target at version {current_version}, our last write got {(ours or {}).get('version')}: {conflict}"
    await emit_audit("conflict", record, detail=detail[:500])
    log.error(
        "conflict: %s at %s changed since our last write (now version %s); change not applied",
        record.target_ref,
        record.target,
        current_version,
        extra=record_fields(record),
    )
    reason, current = str(conflict), conflict.current
    value = conflict_record(
        record, carried.value, carried.origin, reason, current, (ours or {}).get("version"), now_ms()
    )
    await deliver(conflicts, carried.key, value)


def _bundle_candidate(event: EventT, record: RoutedResource | None) -> RoutedResource | None:
    """The record (decoded by _plain_record), if it can go into a transaction bundle: an upsert the sink
    would write right now (nothing queued before it, not superseded, no operator decision on it); else None."""
    if record is None or record.is_delete or record.resource is None or record.op == MOVE:
        return None
    with processing(event):  # the table as the batch's records before it in its partition left it
        order = SinkOrder(current(blocked_by_reference))
        ref = record.target_ref
        if order.route(ref, Carried.of(event).identity) != "write" or order.blocker(ref) is not None:
            return None
        if order.decided(ref) and captured_at_target(config, record):  # written as central's (_sink_one)
            return None
        if order.superseded(ref, f"{record.site}|{record.source_id}", record.source_lsn):
            return None
    return record


async def _write_bundle(stage: str, batch: list[tuple[EventT, RoutedResource]], attempts: int) -> None:
    """One patient's upserts in one transaction; if it fails, each is written alone (and its failure routed).

    A resource the sink has no version of goes into the bundle with the If-Match under which the target
    only creates (FhirClient.create_only_version): if the target holds anything there, the transaction
    fails as a whole and each resource is written alone, which reads it and decides (pipeline/sink.py
    write_record). A target to be read first (first_write "read") gets one batch of reads instead: absent,
    a resource goes into the bundle; present (the table lost a write in a crash), it is written alone.
    Nothing is written blind over a version we do not know.
    """
    target = batch[0][1].target
    client = _client(target)
    with processing(batch[0][0]):  # one patient's records: one partition, whose table this is
        versions = TargetVersions(current(blocked_by_reference))
        known = {r.target_ref: versions.get(r.target_ref, {}).get("version") for _, r in batch}
    unknown = [ref for ref, version in known.items() if version is None]
    guard = client.create_only_version
    if guard is not None:
        known |= dict.fromkeys(unknown, guard)
        unknown = []
    present: set[str] = set()
    if unknown:
        try:
            # Present, or deleted (an empty dict): written alone, which reads it and decides (a change older than
            # the deletion is not written, pipeline/sink.py _deleted_since).
            present = {ref for ref, found in (await client.read_many(unknown)).items() if found is not None}
        except Exception as error:  # one at a time says which failed, and why
            log.info("reads before a bundle of %d to %s failed (%s); writing one at a time", len(batch), target, error)
            present = set(unknown)
    alone = [(event, r) for event, r in batch if r.target_ref in present]
    batch = [(event, r) for event, r in batch if r.target_ref not in present]
    if len(batch) > 1:
        entries = [(r.target_ref, body_to_write(r), known[r.target_ref]) for _, r in batch]
        try:
            outcomes = await client.transaction_put(entries)
        except Exception as error:  # all or nothing: none was written; one at a time says which, and why
            reason = error.error_class if isinstance(error, CdrsyncError) else type(error).__name__
            log.info("bundle of %d to %s not applied (%s); writing one at a time", len(batch), target, reason)
            outcomes = [None] * len(batch)
        BUNDLES.labels(target, "applied" if outcomes[0] is not None else "split").inc()
    else:
        outcomes = [None] * len(batch)
    for (event, record), outcome in zip(batch, outcomes, strict=True):
        await _sink(stage, event, attempts, prewritten=outcome, decoded=record)
    for event, record in alone:
        await _sink(stage, event, attempts, decoded=record)


async def _sink_group(stage: str, events: list[EventT], attempts: int) -> None:
    """One patient's ready records, in order: runs of upserts go as transaction bundles, the rest one by one;
    Provenances are written alongside (pipeline/provenance.py runs_alongside), each once its resource is."""
    run: list[tuple[EventT, RoutedResource]] = []
    after_run: list[tuple[EventT, RoutedResource]] = []  # Provenances to start once `run` is written
    alongside = _Alongside(stage, attempts)

    async def flush() -> None:
        if len(run) == 1:
            await _sink(stage, run[0][0], attempts, decoded=run[0][1])
        elif run:
            await _write_bundle(stage, list(run), attempts)
        run.clear()
        for item in after_run:
            alongside.start(*item)
        after_run.clear()

    try:
        for event in events:
            plain = _plain_record(event)
            if plain is not None and runs_alongside(plain) and _free(event, plain):
                if plain.target_ref in alongside or any(r.target_ref == plain.target_ref for _, r in after_run):
                    await flush()  # the same Provenance again: after the first, as any two versions
                    await alongside.wait()
                if run:
                    after_run.append((event, plain))  # what it points at may be in the run: not written yet
                else:
                    alongside.start(event, plain)
                continue
            if plain is None or plain.is_delete:  # a delete takes its Provenances with it: they go first
                await flush()
                await alongside.wait()
                await _sink(stage, event, attempts, decoded=plain)
                continue
            record = _bundle_candidate(event, plain) if settings.sink_bundle_max > 1 else None
            if record is not None and any(
                r.target_ref == record.target_ref or r.target != record.target for _, r in run
            ):
                await flush()  # an earlier version of it first: how that went decides whether this one waits
                record = _bundle_candidate(event, plain)
            if record is None:
                await flush()
                await _sink(stage, event, attempts, decoded=plain)
                continue
            run.append((event, record))
            if len(run) >= settings.sink_bundle_max:
                await flush()
        await flush()
        await alongside.wait()
    finally:  # cancelled (a rebalance, a shutdown) or failed: nothing of it writes on afterwards
        alongside.cancel()


def _free(event: EventT, record: RoutedResource) -> bool:
    """Whether nothing waits at the record's resource, so a write of it beside the patient's other writes touches
    no one else's order state. Otherwise (a version of it failed before, one is queued there, a group delete holds
    it) it is written in line: releasing or queueing there may change other resources' entries, which a write
    alongside, applying its own copy of the table later, would overwrite."""
    with processing(event):
        return SinkOrder(current(blocked_by_reference)).free(record.target_ref)


def _plain_record(event: EventT) -> RoutedResource | None:
    """The record, unless it carries an operator's decision or does not decode (handled on its own)."""
    if any(name in (DISCARD_HEADER, RESOLUTION_HEADER) for name, _ in headers_of(event)):
        return None
    try:
        return decode(event.message.value, RoutedResource)
    except PermanentError:
        return None


class _Alongside:
    """A patient's Provenances in flight beside its other writes, up to sink_in_flight at once."""

    def __init__(self, stage: str, attempts: int) -> None:
        self.stage, self.attempts = stage, attempts
        self.limit = asyncio.Semaphore(settings.sink_in_flight)
        self.tasks: dict[str, asyncio.Future[None]] = {}

    def __contains__(self, ref: object) -> bool:
        return ref in self.tasks

    def start(self, event: EventT, record: RoutedResource) -> None:
        async def write() -> None:
            async with self.limit:
                await _sink(self.stage, event, self.attempts, decoded=record)

        self.tasks[record.target_ref] = asyncio.ensure_future(write())

    async def wait(self) -> None:
        """Until every write started is done (a failure raises: a bug, as anywhere in the sink)."""
        tasks = list(self.tasks.values())
        if tasks:
            await asyncio.gather(*tasks)
        self.tasks = {}

    def cancel(self) -> None:
        """Stop the writes still in flight: their batch will not be acknowledged, and is read again."""
        for task in self.tasks.values():
            task.cancel()
        self.tasks = {}


def sink_groups(events: list[EventT]) -> list[list[EventT]]:
    """The batch split by Kafka key (the global patient key), each group in arrival order."""
    groups: dict[bytes | None, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.key, []).append(event)
    return list(groups.values())


@app.agent(ready, concurrency=1)
async def write_resources(stream: StreamT) -> None:
    """Write ready resources to their target; commit only after the target acknowledged.

    Records come in batches (agents/batches.py: up to sink_batch_max, closed as soon as no further record
    is waiting, so a quiet pipeline pays no latency for it). Each patient's records are written in order,
    several patients at once (sink_in_flight), one patient's upserts as transaction bundles, its Provenances
    alongside (each once the resource it points at is written). Faust
    acknowledges a batch only when every record of it is handled (agents/routing.py batched), so offsets
    are committed only up to records that are written, retrying, dead-lettered or kept as conflicts.
    """
    limit = asyncio.Semaphore(settings.sink_in_flight)

    async def one_patient(group: list[EventT]) -> None:
        async with limit:
            await _sink_group("sink", group, settings.sink_attempts)

    async for events in take_batches(
        stream,
        settings.sink_batch_max,
        settings.sink_batch_seconds,
        close_early=settings.batch_close_early,
        stage="sink",
    ):
        async with batched(len(events)):  # audit events and the like acknowledged together, then the table
            results = await asyncio.gather(*(one_patient(g) for g in sink_groups(events)), return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:  # a bug: acknowledging the batch would lose its records
                log.critical("sink batch failed unexpectedly: %r; exiting without acknowledging it", failed[0])
                os._exit(_EXIT_SINK_BUG)
