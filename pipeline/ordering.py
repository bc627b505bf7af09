"""Stage 3: release a resource only once everything it references has been released before it.

State is three mappings (Faust tables in the worker, dicts in tests), all for one partition, which
holds every record of the patients keyed to it:
  released_by_reference   target ref → content hash of the version released ("" for none yet)
  parked_by_reference     missing target ref → records waiting for it, in arrival order
  waiting_by_reference    target ref of a parked record → the ref it waits for
The sink writes one partition in order, so "released earlier in this partition" means "written
earlier at the target". A later version of a parked resource queues behind it: per-resource
version order is never inverted.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from .records import RoutedResource, decode, encode

__all__ = ["OrderState", "Parked", "expire_parked", "order_record"]


@dataclass
class OrderState:
    """The three tables the order stage keeps."""

    released: MutableMapping[str, str]
    parked: MutableMapping[str, list[dict[str, Any]]]
    waiting: MutableMapping[str, str]


@dataclass(frozen=True)
class Parked:
    """A record that waited too long for a reference."""

    record: RoutedResource
    missing: str
    since_ms: int


def _park(state: OrderState, record: RoutedResource, missing: str, now_ms: int, partition: int) -> None:
    entry = {"record": base64.b64encode(encode(record)).decode(), "since_ms": now_ms, "partition": partition}
    state.parked[missing] = [*state.parked.get(missing, []), entry]
    state.waiting[record.target_ref] = missing


def _admit(state: OrderState, record: RoutedResource, now_ms: int, partition: int) -> RoutedResource | None:
    ref = record.target_ref
    if ref in state.waiting:  # an earlier version is parked: keep version order
        _park(state, record, state.waiting[ref], now_ms, partition)
        return None
    if record.is_delete:
        state.released.pop(ref, None)
        return record
    missing = next((d for d in record.dependencies if d != ref and d not in state.released), None)
    if missing is not None:
        _park(state, record, missing, now_ms, partition)
        return None
    state.released[ref] = record.content_hash or ""
    return record


def _unpark(state: OrderState, ref: str) -> list[RoutedResource]:
    entries = state.parked.pop(ref, [])
    records = [decode(base64.b64decode(entry["record"]), RoutedResource) for entry in entries]
    for record in records:
        if state.waiting.get(record.target_ref) == ref:
            del state.waiting[record.target_ref]
    return records


def order_record(state: OrderState, record: RoutedResource, now_ms: int, partition: int = 0) -> list[RoutedResource]:
    """Admit one record; return every record now releasable, in the order to write them."""
    released: list[RoutedResource] = []
    queue = deque([record])
    while queue:
        admitted = _admit(state, queue.popleft(), now_ms, partition)
        if admitted is None:
            continue
        released.append(admitted)
        if not admitted.is_delete:
            # Depth first: what waited for this record is admitted before anything queued after it, so a
            # resource re-parked on another reference cannot be overtaken by its own later version.
            queue.extendleft(reversed(_unpark(state, admitted.target_ref)))
    return released


def expire_parked(state: OrderState, now_ms: int, limit_ms: int, partition: int = 0) -> list[Parked]:
    """Remove and return this partition's parked records older than the limit, oldest wait first.

    Only the given partition's entries are touched: table changes are written to the changelog
    partition of the record being processed, so another partition's keys must not change here.
    """
    expired: list[Parked] = []
    due = [
        missing
        for missing, entries in list(state.parked.items())
        if entries and entries[0]["partition"] == partition and entries[0]["since_ms"] + limit_ms <= now_ms
    ]
    for missing in due:
        since = [entry["since_ms"] for entry in state.parked.get(missing, [])]
        for record, parked_ms in zip(_unpark(state, missing), since, strict=True):
            expired.append(Parked(record, missing, parked_ms))
    return expired
