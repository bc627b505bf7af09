"""Trigger wiring for the order stage: which records a triggered route sends (pipeline/trigger.py)."""

from __future__ import annotations

import logging

from pipeline.flowmetrics import TRIGGER_SELECTIONS
from pipeline.observe import record_fields
from pipeline.records import RoutedResource
from pipeline.staging import Staged
from pipeline.trigger import TRIGGER_ALL, Selection, TriggerTables, route_trigger, select_records

from .app import config, table
from .audit import emit_audit

__all__ = ["report_selection", "select_for_route", "staged_trigger_tables", "trigger_states"]

log = logging.getLogger("cdrsync.trigger")

# Co-partitioned with fhir.identified.v1 (keyed by global patient key), like the order stage's tables.
_partitions = config.topics.partitions_of("identified")
trigger_flags_by_route_patient = table("trigger_flags_by_route_patient", _partitions)
trigger_resource_by_route_reference = table("trigger_resource_by_route_reference", _partitions)
trigger_held_by_route_anchor = table("trigger_held_by_route_anchor", _partitions)


def trigger_states() -> TriggerTables:
    """The trigger tables, changes held back until the records they describe are acknowledged."""
    return TriggerTables(
        Staged(trigger_flags_by_route_patient),
        Staged(trigger_resource_by_route_reference),
        Staged(trigger_held_by_route_anchor),
    )


def staged_trigger_tables(tables: TriggerTables) -> list[Staged]:
    """The staged tables of `trigger_states()`, for apply_tables."""
    staged = [tables.flags, tables.resources, tables.held]
    assert all(isinstance(table, Staged) for table in staged)
    return staged  # type: ignore[return-value]


def select_for_route(states: TriggerTables, record: RoutedResource) -> Selection:
    """What the record's route sends now (everything on a `trigger: all` route)."""
    return select_records(states, record, route_trigger(config, record))


async def report_selection(incoming: RoutedResource, selection: Selection) -> None:
    """Metrics, audit events and a log line for a triggered route's choice (after delivery)."""
    trigger = route_trigger(config, incoming)
    if trigger == TRIGGER_ALL:
        return
    labels = (incoming.site, incoming.target)
    if selection.held:
        TRIGGER_SELECTIONS.labels(*labels, incoming.resource_type, "held").inc()
        await emit_audit("trigger_held", incoming, trigger=trigger, detail="no active tumour-board flag selects it")
    backfilled = {id(item) for item in selection.backfilled}
    for item in selection.send:
        outcome = "backfilled" if id(item) in backfilled else "sent"
        TRIGGER_SELECTIONS.labels(*labels, item.resource_type, outcome).inc()
        if outcome == "backfilled":
            await emit_audit("backfilled", item, trigger=trigger, detail=f"selected by {selection.flag}")
    if selection.backfilled:
        log.info(
            "%s activated: %d earlier record(s) backfilled to %s",
            selection.flag,
            len(selection.backfilled),
            incoming.target,
            extra=record_fields(incoming),
        )
