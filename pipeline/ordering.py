"""Stage 3: release a resource only once what it references has been released before it.

State is four mappings (Faust tables in the worker, dicts in tests), all for one partition, which
holds every record of the patients keyed to it:
  released_by_reference   target ref → {hash, deps, site, lsn} of the version released (deps: what it
                          references; lsn: its source position; handed: true when it was released in another
                          partition, before an identity move, pipeline/patientmove.py)
  parked_by_reference     park key → records waiting on it, in arrival order
  waiting_by_reference    target ref of a parked record → the park key it waits on
  referrers_by_reference  target ref → refs of released resources that referenced it (may be stale)
A park key is a target ref (waiting for it to be written) or "~" + a target ref (a delete waiting for
that resource, which still references the deleted one, to be deleted or changed).
The sink writes one partition in order, so "released earlier in this partition" means "written
earlier at the target".

FHIR references can form cycles (Encounter.diagnosis → Condition → Condition.encounter), so a
resource cannot always wait for everything it references. Two kinds of dependency:
  hard  a reference to a type of lower rank (Patient < Encounter, Coverage < everything else):
        acyclic by construction; the resource waits until it is released.
  soft  any other reference: if it is not released yet, the resource is released at once with that
        reference made pending (a logical reference naming the target id), and its full version is
        parked as a *completion* and released again right after the referenced resource.
A later version of a hard-parked resource queues behind it, so version order is never inverted;
a later version of a resource whose completion is parked supersedes that completion.

Deletes mirror creates: the target refuses to delete what another resource still references, so a
delete waits until its referrers are deleted (or no longer reference it). Resources that reference
each other and are all being deleted are released as one delete (`delete_with`), which the sink
writes as one transaction.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
from collections import deque
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .records import RoutedResource, canonical_hash, decode, encode
from .references import map_references
from .resources import dependency_rank
from .staging import Staged

__all__ = [
    "PENDING_REFERENCE_SYSTEM",
    "OrderState",
    "ParkDeadlines",
    "Parked",
    "Staged",
    "adopt_released",
    "expire_parked",
    "hold",
    "is_stale",
    "live_referrers",
    "order_record",
    "staged",
    "take_parked",
    "take_parked_of",
]

# Identifier system of a reference written before its target: the value is the target reference.
PENDING_REFERENCE_SYSTEM = "urn:cdrsync:pending-reference"


@dataclass
class OrderState:
    """The tables the order stage keeps."""

    released: MutableMapping[str, dict[str, Any]]
    parked: MutableMapping[str, list[dict[str, Any]]]
    waiting: MutableMapping[str, str]
    referrers: MutableMapping[str, list[str]]
    #: target ref → {"site|source id": the highest source LSN seen}: a change Debezium re-sends after a
    #: crash of Kafka Connect, older than one already seen, is stale and not written over the newer one.
    #: Per source row: two local records of one person merge into one central Patient, and their
    #: changes may reach this stage in any order.
    positions: MutableMapping[str, dict[str, int]] = field(default_factory=dict)
    #: when parks fall due, so that expiry need not read every parked record (None: it scans them all)
    deadlines: ParkDeadlines | None = None


class ParkDeadlines:
    """When each partition's parks fall due: an index, so that expiry reads only the parks it expires.

    Without it, every partition's expiry check read and decoded every parked record of the worker (a
    back-load can park tens of thousands) in the order stage, holding up every stage each time.

    Per partition, a heap of (since_ms, park key) for every record parked to wait (completions never
    expire and are not in it). The index may hold more than is parked (a key released or parked again
    since): each key is checked against the table when it falls due. It must never hold less: `_park`
    notes every park, and after each rebalance (`invalidate`) the worker rebuilds it from its table
    before it expires anything, since another worker may have parked records in the partitions it gets.
    """

    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, str]]] = {}
        self._generation = 0
        self.built = False

    @property
    def size(self) -> int:
        """Entries held (stale ones included, until they fall due)."""
        return sum(len(heap) for heap in self._heaps.values())

    def invalidate(self) -> None:
        """Forget everything: the next expiry check must `rebuild` first."""
        self._heaps = {}
        self._generation += 1
        self.built = False

    def note(self, partition: int, since_ms: int, missing: str) -> None:
        """A record parked on `missing` in `partition` at `since_ms`."""
        heapq.heappush(self._heaps.setdefault(partition, []), (since_ms, missing))

    async def rebuild(self, parked: Iterable[tuple[str, list[dict[str, Any]]]], *, every: int = 256) -> bool:
        """Index every park of `parked` (park key → entries), letting the event loop run after every
        `every` keys. False if `invalidate` was called meanwhile (a rebalance): the index stays unbuilt."""
        generation = self._generation
        for n, (missing, entries) in enumerate(parked, 1):
            since = _waiting_since(entries)
            if since is not None:
                self.note(entries[0]["partition"], since, missing)
            if n % every == 0:
                await asyncio.sleep(0)
        if generation != self._generation:
            return False
        self.built = True
        return True

    def due(self, partition: int, now_ms: int, limit_ms: int) -> list[str]:
        """Remove and return the park keys of `partition` noted at least `limit_ms` before `now_ms`,
        oldest first, each once. The caller checks each against the table (`expire_parked`)."""
        heap = self._heaps.get(partition, [])
        keys: dict[str, None] = {}
        while heap and heap[0][0] + limit_ms <= now_ms:
            keys[heapq.heappop(heap)[1]] = None
        return list(keys)


def _waiting_since(entries: list[dict[str, Any]]) -> int | None:
    """When the oldest record of a park list that waits (not a completion) was parked; None if none waits."""
    return next((entry["since_ms"] for entry in entries if not entry["completion"]), None)


def staged(state: OrderState) -> OrderState:
    """The same state with every change held back until its `staged_tables` are applied."""
    return OrderState(
        Staged(state.released),
        Staged(state.parked),
        Staged(state.waiting),
        Staged(state.referrers),
        Staged(state.positions),
        state.deadlines,
    )


def staged_tables(state: OrderState) -> list[Staged]:
    """The staged tables of a state made by `staged`."""
    tables = [state.released, state.parked, state.waiting, state.referrers, state.positions]
    assert all(isinstance(table, Staged) for table in tables)
    return tables  # type: ignore[return-value]


@dataclass(frozen=True)
class Parked:
    """A record that waited too long for a reference."""

    record: RoutedResource
    missing: str
    since_ms: int


def _is_hard(record: RoutedResource, dependency: str) -> bool:
    return dependency_rank(dependency.split("/", 1)[0]) < dependency_rank(record.resource_type)


def _park(
    state: OrderState, record: RoutedResource, missing: str, now_ms: int, partition: int, *, completion: bool
) -> None:
    entry = {
        "record": base64.b64encode(encode(record)).decode(),
        "ref": record.target_ref,
        "since_ms": now_ms,
        "partition": partition,
        "completion": completion,
        "delete": record.is_delete,
        "patient": record.patient_key,  # whose it is, without decoding it (entries parked before lack both)
        "site": record.site,
    }
    state.parked[missing] = [*state.parked.get(missing, []), entry]
    state.waiting[record.target_ref] = missing
    if state.deadlines is not None and not completion:
        state.deadlines.note(partition, now_ms, missing)


def hold(state: OrderState, record: RoutedResource, key: str, now_ms: int, partition: int = 0) -> None:
    """Park a record under a key of the caller's (not a reference: pipeline/patientmove.py `hold_for_handover`),
    behind any record already there; `take_parked` takes it out again, and it expires as any park does."""
    _park(state, record, key, now_ms, partition, completion=False)


def _parked_entry(state: OrderState, ref: str) -> dict[str, Any] | None:
    """The parked entry of a resource (the last one, if several versions wait)."""
    missing = state.waiting.get(ref)
    entries = [e for e in state.parked.get(missing, []) if e["ref"] == ref] if missing else []
    return entries[-1] if entries else None


def _drop_completion(state: OrderState, ref: str) -> None:
    missing = state.waiting.pop(ref)
    remaining = [e for e in state.parked.get(missing, []) if e["ref"] != ref]
    if remaining:
        state.parked[missing] = remaining
    else:
        state.parked.pop(missing, None)


def _with_pending_references(record: RoutedResource, pending: set[str]) -> RoutedResource:
    """The record with references to not-yet-written resources made logical (to be completed later)."""

    def make_pending(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
        if reference not in pending:
            return None
        out = {k: v for k, v in node.items() if k != "reference"}
        out.setdefault("type", reference.split("/", 1)[0])
        out["identifier"] = {"system": PENDING_REFERENCE_SYSTEM, "value": reference}
        return out

    assert record.resource is not None
    body = map_references(orjson.loads(record.resource), make_pending)
    return replace(
        record,
        resource=orjson.dumps(body).decode(),
        content_hash=canonical_hash(body),
        dependencies=[d for d in record.dependencies if d not in pending],
    )


_AWAITING_DELETE = "~"


def live_referrers(state: OrderState, ref: str) -> list[str]:
    """Released resources whose released version references ref."""
    return [r for r in state.referrers.get(ref, []) if ref in state.released.get(r, {}).get("deps", ())]


def _parked_delete(state: OrderState, ref: str) -> bool:
    entry = _parked_entry(state, ref)
    return entry is not None and bool(entry.get("delete")) and state.waiting[ref].startswith(_AWAITING_DELETE)


def _delete_group(state: OrderState, ref: str) -> tuple[set[str], str | None]:
    """Resources to delete together with ref, or the first referrer that is not being deleted."""
    group, frontier = {ref}, [ref]
    while frontier:
        for referrer in live_referrers(state, frontier.pop()):
            if referrer in group:
                continue
            if not _parked_delete(state, referrer):
                return group, referrer
            group.add(referrer)
            frontier.append(referrer)
    return group, None


def _admit_delete(state: OrderState, record: RoutedResource, now_ms: int, partition: int) -> RoutedResource | None:
    ref = record.target_ref
    group, blocker = _delete_group(state, ref)
    if blocker is not None:
        _park(state, record, _AWAITING_DELETE + blocker, now_ms, partition, completion=False)
        return None
    others = sorted(group - {ref})
    # Last released in another partition (taken over after an identity move, `adopt_released`): that partition's
    # sink may not have written it yet, and this delete must not go first (pipeline/sink.py `_delete`). The same
    # for each resource deleted with it: the sink deletes the group only once the target holds all of them.
    awaited = []
    for other in others:  # their parked deletes are carried by this one
        if (awaits := _awaited_lsn(state, other)) is not None and (parked := _parked_entry(state, other)):
            carried = decode(base64.b64decode(parked["record"]), RoutedResource)
            awaited.append({"ref": other, "row": _source_row(carried), "lsn": awaits})
        _drop_completion(state, other)
    awaits = _awaited_lsn(state, ref)
    for member in group:
        state.released.pop(member, None)
    if awaits is not None:
        record = replace(record, awaits_lsn=awaits)
    if awaited:
        record = replace(record, awaits_with=awaited)
    return replace(record, delete_with=others) if others else record


def _awaited_lsn(state: OrderState, ref: str) -> int | None:
    """The source position of ref's change released in another partition (`handed`), if that is its last."""
    entry = state.released.get(ref) or {}
    return entry.get("lsn") if entry.get("handed") else None


def _admit(state: OrderState, record: RoutedResource, now_ms: int, partition: int) -> RoutedResource | None:
    ref = record.target_ref
    if ref in state.waiting:
        parked = _parked_entry(state, ref)
        if parked is not None and (parked["completion"] or _parked_delete(state, ref)):
            _drop_completion(state, ref)  # this newer version supersedes the parked completion or delete
        else:  # an earlier version waits for a hard dependency: keep version order
            _park(state, record, state.waiting[ref], now_ms, partition, completion=False)
            return None
    if record.is_delete:
        return _admit_delete(state, record, now_ms, partition)
    unreleased = [d for d in record.dependencies if d != ref and d not in state.released]
    hard = next((d for d in unreleased if _is_hard(record, d)), None)
    if hard is not None:
        _park(state, record, hard, now_ms, partition, completion=False)
        return None
    if unreleased:
        _park(state, record, unreleased[0], now_ms, partition, completion=True)
        record = _with_pending_references(record, set(unreleased))
    entry = {"hash": record.content_hash or "", "deps": record.dependencies, "site": record.site}
    state.released[ref] = entry if record.source_lsn is None else {**entry, "lsn": record.source_lsn}
    for dependency in record.dependencies:
        known = state.referrers.get(dependency, [])
        if ref not in known:
            state.referrers[dependency] = [*known, ref]
    return record


def _unpark(state: OrderState, ref: str) -> list[RoutedResource]:
    entries = state.parked.pop(ref, [])
    for entry in entries:
        if state.waiting.get(entry["ref"]) == ref:
            del state.waiting[entry["ref"]]
    return [decode(base64.b64decode(entry["record"]), RoutedResource) for entry in entries]


def take_parked(state: OrderState, ref: str) -> list[RoutedResource]:
    """Take out every record waiting for ref to be written (not its completions), in order: for a resource that
    will never be written here (a Patient whose records moved to another, pipeline/patientmove.py)."""
    entries = state.parked.get(ref, [])
    keep = [entry for entry in entries if entry["completion"]]
    state.parked[ref] = [entry for entry in entries if not entry["completion"]]
    taken = _unpark(state, ref)
    if keep:
        state.parked[ref] = keep
        for entry in keep:
            state.waiting[entry["ref"]] = ref
    return taken


def is_stale(state: OrderState, record: RoutedResource) -> bool:
    """True for a change older (by source LSN) than one of the same resource and site already seen.

    Debezium delivers at least once: after Kafka Connect dies it sends again what followed its last
    flushed offset. Changes of one row come in LSN order, so an LSN below the highest seen is a re-send
    whose newer version is already on its way; writing it would put old content back for a while.
    """
    if record.source_lsn is None:
        return False
    seen = state.positions.get(record.target_ref, {}).get(_source_row(record))
    return seen is not None and record.source_lsn < seen


def older_message(state: OrderState, record: RoutedResource, inbox_row: int | None) -> int | None:
    """For a message re-queued at an HL7 v2 hospital (an UPDATE of its inbox row; `inbox_row`: that row's id, None
    for any other source): the id of a later inbox row whose message changed the same resource since, if any.

    An HL7 v2 hospital sends each change of a resource as a new message, a new row of its inbox; the rows' ids
    are the order it received them in. A message re-queued (its row updated) is read again with a new LSN, so
    LSNs alone take it for the newest: written, it would put back a result its later messages corrected. A new
    message (an INSERT) is never held back by this: after the inbox's id sequence restarts (a re-created
    table), new messages have lower ids than those seen before.
    """
    if inbox_row is None or record.op != "UPDATE":
        return None
    latest = state.positions.get(record.target_ref, {}).get(_inbox_key(record))
    return latest if latest is not None and inbox_row < latest else None


def _source_row(record: RoutedResource) -> str:
    return f"{record.site}|{record.source_id}"


_INBOX = "|inbox"  # positions' key suffix for an inbox row rather than an LSN (no FHIR id contains "|")


def _inbox_key(record: RoutedResource) -> str:
    """Where positions keep the latest inbox row of a resource's HL7 v2 messages."""
    return f"{_source_row(record)}{_INBOX}"


def order_record(
    state: OrderState, record: RoutedResource, now_ms: int, partition: int = 0, inbox_row: int | None = None
) -> list[RoutedResource]:
    """Admit one record; return every record now releasable, in the order to write them. `inbox_row`: the id
    of the HL7 v2 inbox row the change came from (see older_message), None for any other source."""
    seen = state.positions.get(record.target_ref, {})
    later = {}
    if record.source_lsn is not None and record.source_lsn > seen.get(_source_row(record), -1):
        later[_source_row(record)] = record.source_lsn
    if inbox_row is not None and inbox_row != seen.get(_inbox_key(record)):  # the last message admitted
        later[_inbox_key(record)] = inbox_row
    if later:
        state.positions[record.target_ref] = {**seen, **later}
    return _drain(state, deque([record]), now_ms, partition)


def _drain(state: OrderState, queue: deque[RoutedResource], now_ms: int, partition: int) -> list[RoutedResource]:
    """Admit the queued records and, depth first, what each one released; return what was released, in order."""
    released: list[RoutedResource] = []
    while queue:
        admitted = _admit(state, queue.popleft(), now_ms, partition)
        if admitted is None:
            continue
        released.append(admitted)
        # Depth first: what waited for this record is admitted before anything queued after it, so a
        # resource re-parked on another reference cannot be overtaken by its own later version.
        for ref in [admitted.target_ref, *admitted.delete_with]:
            # Deletes that waited for this resource to go (or to drop its reference) try again.
            queue.extendleft(reversed(_unpark(state, _AWAITING_DELETE + ref)))
            if not admitted.is_delete:
                queue.extendleft(reversed(_unpark(state, ref)))
    return released


def adopt_released(
    state: OrderState,
    entries: Mapping[str, dict[str, Any]],
    positions: Mapping[str, dict[str, int]],
    now_ms: int,
    partition: int = 0,
) -> list[RoutedResource]:
    """Resources released in another partition, known as released here too (`entries`: target ref → its entry
    in released_by_reference there; `positions`: its source positions there); return what waited here for them,
    now releasable, in order.

    A site's records change partitions when their Patient does (an accepted identity review,
    pipeline/patientmove.py): its later records reference resources released before, in the previous
    Patient's partition, whose tables this partition cannot read. What this partition saw of a resource itself
    (released, or deleted, here since) stands, unless the entry handed over comes from a later change of its
    source row (by LSN): a hand-over may arrive late, twice, or replayed from a dead letter.
    """
    adopted = []
    for ref, entry in entries.items():
        ours, theirs = state.positions.get(ref, {}), positions.get(ref, {})
        seen_here = ref in state.released or bool(ours)
        later = [row for row, lsn in theirs.items() if not row.endswith(_INBOX) and lsn > ours.get(row, -1)]
        if seen_here and not later:
            continue
        # Released there ("handed"): a delete released here waits at the sink until the target holds that change
        # (its "lsn"), which the other partition's sink may not have written yet (`_admit_delete`).
        state.released[ref] = {**entry, "handed": True}
        for dependency in entry.get("deps", []):
            known = state.referrers.get(dependency, [])
            if ref not in known:
                state.referrers[dependency] = [*known, ref]
        adopted.append(ref)
    for ref, theirs in positions.items():
        ours = state.positions.get(ref, {})
        merged = {**ours, **{row: max(lsn, ours.get(row, lsn)) for row, lsn in theirs.items()}}
        if merged != ours:
            state.positions[ref] = merged
    # All of them released first, then what waited: a record waiting for several of them is released once.
    waited = deque(record for ref in adopted for record in _unpark(state, ref))
    return _drain(state, waited, now_ms, partition)


def take_parked_of(state: OrderState, patient_key: str, site: str, partition: int) -> list[RoutedResource]:
    """Take out every record of a site and patient parked in this partition (waiting, completions, deletes
    waiting for their referrers), each park list's in its order: for a patient whose records moved to another
    Patient (pipeline/patientmove.py). Reads every park list of the worker once: for a rare event only."""
    taken: list[dict[str, Any]] = []  # each list's in its order (one resource's versions are in one list)
    for missing in list(state.parked):
        entries = state.parked.get(missing) or []
        if not entries or entries[0]["partition"] != partition:
            continue
        mine = {n for n, entry in enumerate(entries) if _owner(entry) == (patient_key, site)}
        if not mine:
            continue
        taken += [entry for n, entry in enumerate(entries) if n in mine]
        left = [entry for n, entry in enumerate(entries) if n not in mine]
        if left:
            state.parked[missing] = left
        else:
            del state.parked[missing]
        for n in mine:
            ref = entries[n]["ref"]
            if state.waiting.get(ref) == missing and not any(entry["ref"] == ref for entry in left):
                del state.waiting[ref]
    return [decode(base64.b64decode(entry["record"]), RoutedResource) for entry in taken]


def _owner(entry: dict[str, Any]) -> tuple[str, str]:
    if "patient" in entry:
        return entry["patient"], entry["site"]
    record = decode(base64.b64decode(entry["record"]), RoutedResource)
    return record.patient_key, record.site


def expire_parked(state: OrderState, now_ms: int, limit_ms: int, partition: int = 0) -> list[Parked]:
    """Remove and return this partition's parked records that have waited longer than the limit.

    A park list is due when its oldest waiting record has waited `limit_ms`; all its waiting records go
    together (what they wait for never came). Completions are not expired: their resource is already
    written, with a pending reference. Only the given partition's entries are touched: table changes are
    written to the changelog partition of the record being processed, so another partition's keys must
    not change here. With `state.deadlines` built, only the keys it says are due are read; without,
    every park list is.
    """
    deadlines = state.deadlines if state.deadlines is not None and state.deadlines.built else None
    lists: Iterable[tuple[str, list[dict[str, Any]]]]
    if deadlines is not None:
        lists = ((missing, state.parked.get(missing) or []) for missing in deadlines.due(partition, now_ms, limit_ms))
    else:
        lists = list(state.parked.items())
    expired: list[Parked] = []
    for missing, entries in lists:
        since = _waiting_since(entries)
        if since is None:
            continue  # released, or only completions left
        if entries[0]["partition"] != partition or since + limit_ms > now_ms:
            if deadlines is not None:
                deadlines.note(entries[0]["partition"], since, missing)  # not due here, or not yet: keep it
            continue
        waited = [entry["since_ms"] for entry in entries if not entry["completion"]]
        for record, parked_ms in zip(take_parked(state, missing), waited, strict=True):
            expired.append(Parked(record, missing, parked_ms))
    return expired
