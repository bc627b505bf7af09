"""Per-resource order at the sink: while one version of a resource waits in a retry tier or the
dead-letter topic, the later versions of that resource wait behind it, in arrival order.

Without this a retry would invert the order: version 1 fails for a minute, version 2 is written at
once, then version 1 comes back from its retry tier and overwrites it. Only that one resource waits;
other resources, of the same patient or of others, pass.

State, per target reference (a table co-partitioned with the ready topic, so one worker owns it):
the version at the head (its identity: where it first failed, stable across tiers and replays), why
it waits ("retrying" or "dead"), the later versions queued behind it (their encoded records), and the
identities recently written, so that a stale copy of a retry (a crash re-sent it) is recognised and
not written over a newer version. A head that is written releases the queue, in order.

A delete of several resources in one transaction (a reference cycle, a resource with its Provenances:
`delete_with`) holds each of them: it takes its place in the queue of every one of them that waits
behind another version, and claims the others (state "queued"), so that a later version of any of them
(a re-creation, a Provenance of it) waits behind the delete instead of being written, then deleted with
the group. It is written once it is at the head for all of them, and then releases every queue.

It also keeps, per resource and source row, the source LSN last written: when a crash makes the sink
read again records it had already written (its offsets are committed a moment after the writes), an
older version is not written a second time after a newer one, which would put old content back at
the target until the newer one follows.

And it keeps the version the target gave our last write of the resource (its `meta.versionId`):
the next write is sent over that version only (If-Match, pipeline/sink.py), so an edit made at the
target since is detected as a conflict instead of being overwritten (DESIGN.md decision 8).
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Outcome", "Queued", "Route", "SinkOrder", "TargetVersions", "write_in_order"]

Route = Literal["write", "queue", "duplicate"]
#: what one attempt to write came to: written, or not applied but kept (conflict) — both release the
#: queue —, or waiting in a retry tier, or dead-lettered — both keep the versions behind it waiting
Outcome = Literal["written", "conflict", "retrying", "dead"]
_RESOLVED_KEPT = 32


@dataclass(frozen=True)
class Queued:
    """A later version waiting behind the head, as it arrived on the ready topic."""

    identity: str
    key: bytes | None
    value: bytes
    origin: tuple[str, int, int]
    #: every resource it writes, its own first, when it is a group (a delete with `delete_with`); else ()
    group: tuple[str, ...] = ()
    #: the failure headers it came with (back from a retry tier), so that it keeps its identity when it fails again
    headers: tuple[tuple[str, bytes], ...] = ()

    def refs(self, at: str) -> tuple[str, ...]:
        """The resources it writes, at: the one whose queue it came from (its own, for a single resource)."""
        return self.group or (at,)


class SinkOrder:
    """The sink's per-resource order over a table (a Staged mapping: applied after the writes)."""

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self.table = table

    def _entry(self, ref: str) -> dict[str, Any] | None:
        entry = self.table.get(ref)
        return dict(entry) if entry is not None else None

    def route(self, ref: str, identity: str, group: tuple[str, ...] = ()) -> Route:
        """Write it now, queue it behind the head, or drop it as a copy of something already handled.

        group: every resource it writes (Queued.group); it waits if any of them waits behind another version.
        """
        entry = self._entry(ref)
        if entry is not None and entry.get("blocker") == identity:
            # back from a retry tier or the dead letters; or a copy of one that waits for the others of its group
            if entry.get("state") == "queued":
                return "duplicate"
            return "queue" if self._held(group, identity) else "write"  # others held it before it was a group
        if entry is not None:
            if identity in entry.get("resolved", []) or any(q["identity"] == identity for q in entry.get("queue", [])):
                return "duplicate"
            if entry.get("blocker"):
                return "queue"
        return "queue" if self._held(group, identity) else "write"

    def _held(self, refs: tuple[str, ...], identity: str) -> list[str]:
        """Those of refs that wait for a version other than identity."""
        return [r for r in refs if not self.holds_for(r, identity)]

    def holds_for(self, ref: str, identity: str) -> bool:
        """Whether ref waits for nothing, or for identity itself."""
        return (self._entry(ref) or {}).get("blocker") in (None, identity)

    def free(self, ref: str) -> bool:
        """Whether nothing waits at ref: no version failed there, none queued."""
        entry = self._entry(ref) or {}
        return not entry.get("blocker") and not entry.get("queue")

    def decide(self, ref: str) -> None:
        """A reviewer decided a conflict of ref (`cdrsync conflicts resolve`): remembered for good (decided())."""
        self.table[ref] = {**(self._entry(ref) or {"queue": [], "resolved": []}), "decided": True}

    def decided(self, ref: str) -> bool:
        """Whether a reviewer ever decided a conflict of ref: the resource is central's decision since, and the
        hospital's later changes of it are written as central's (pipeline/backflow.py decided_at_central)."""
        return bool((self._entry(ref) or {}).get("decided"))

    def blocker(self, ref: str) -> tuple[str, str] | None:
        """(identity, state) of the version the resource waits for, None when it waits for nothing."""
        entry = self._entry(ref)
        if entry is None or not entry.get("blocker"):
            return None
        return str(entry["blocker"]), str(entry["state"])

    def superseded(self, ref: str, row: str, lsn: int | None) -> bool:
        """True when a later source version of this row was already written to ref."""
        entry = self._entry(ref)
        if lsn is None or entry is None:
            return False
        written = entry.get("written", {}).get(row)
        return written is not None and lsn < written

    def note_written(self, ref: str, row: str, lsn: int | None) -> None:
        """Remember the source position of a version written to ref."""
        if lsn is None:
            return
        entry = self._entry(ref) or {"queue": [], "resolved": []}
        written = dict(entry.get("written", {}))
        if lsn > written.get(row, -1):
            written[row] = lsn
            self.table[ref] = {**entry, "written": written}

    def enqueue(self, ref: str, item: Queued, now_ms: int = 0) -> tuple[str, int]:
        """Queue a later version behind the head: (the resource it waits at first, that queue's length after).

        A group takes its place in the queue of every resource of it that waits, and claims the others."""
        refs = item.refs(ref)
        held = self._held(refs, item.identity)
        assert held, f"{ref} is not blocked"
        lengths = []
        for r in refs:
            entry = self._entry(r) or {"queue": [], "resolved": []}
            if r in held:
                queue = list(entry.get("queue", []))
                if not any(q["identity"] == item.identity for q in queue):
                    queue.insert(_place(queue, item.identity), _encode(item))
                self.table[r] = {**entry, "queue": queue}
                lengths.append(len(queue))
            else:  # free, or its own (back from a tier before it was a group): it waits elsewhere now
                since = entry.get("since_ms") if entry.get("blocker") == item.identity else now_ms
                self.table[r] = {**entry, "blocker": item.identity, "state": "queued", "since_ms": since}
        return held[0], lengths[0]

    def failed(self, ref: str, identity: str, state: Literal["retrying", "dead"], now_ms: int) -> None:
        """The version at the head (or one about to become it) went to a retry tier or the dead letters."""
        entry = self._entry(ref) or {"queue": [], "resolved": []}
        since = (entry.get("since_ms") or now_ms) if entry.get("blocker") == identity else now_ms
        queue = [q for q in entry.get("queue", []) if q["identity"] != identity]
        self.table[ref] = {**entry, "blocker": identity, "state": state, "since_ms": since, "queue": queue}

    def written(self, ref: str, identity: str) -> Queued | None:
        """The head is handled (written, or resolved otherwise); the next queued version, if any, becomes it.

        Returned only when it is its turn at every resource it writes (a group may still wait at another:
        it is then "queued" here, and returned by the written() of the last resource it waits at)."""
        entry = self._entry(ref)
        if entry is None:
            return None
        resolved = [*entry.get("resolved", []), identity][-_RESOLVED_KEPT:]
        queue = list(entry.get("queue", []))
        following = _decode(queue.pop(0)) if queue else None
        self.table[ref] = {
            **entry,
            "blocker": following.identity if following else None,
            "state": "releasing" if following else "clear",
            "queue": queue,
            "resolved": resolved,
        }
        if following is None:
            return None
        if self._held(following.refs(ref), following.identity):
            self.table[ref] = {**self.table[ref], "state": "queued"}
            return None
        for r in following.refs(ref):
            self.table[r] = {**(self._entry(r) or {}), "state": "releasing"}
        return following


class TargetVersions(MutableMapping[str, dict[str, Any]]):
    """The target versions kept in the sink's table, as the mapping pipeline/sink.py reads and updates:
    ref → {"version": the versionId our last write got}. Only refs with a known version are in it."""

    def __init__(self, table: MutableMapping[str, Any]) -> None:
        self.table = table

    def __getitem__(self, ref: str) -> dict[str, Any]:
        entry = self.table.get(ref)
        if entry is None or entry.get("version") is None:
            raise KeyError(ref)
        return {"version": entry["version"]}

    def __setitem__(self, ref: str, value: dict[str, Any]) -> None:
        entry = self.table.get(ref)
        base = dict(entry) if entry is not None else {"queue": [], "resolved": []}
        self.table[ref] = {**base, "version": value["version"]}

    def __delitem__(self, ref: str) -> None:
        entry = self.table.get(ref)
        if entry is None or entry.get("version") is None:
            raise KeyError(ref)
        self.table[ref] = {**entry, "version": None}

    def __iter__(self) -> Iterator[str]:
        return (ref for ref, entry in self.table.items() if entry is not None and entry.get("version") is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _position(identity: str) -> tuple[str, int] | None:
    """("topic[partition]", offset) of an identity (agents/routing.py Carried.identity), None if it has another form."""
    where, _, offset = identity.rpartition("@")
    return (where, int(offset)) if where and offset.isdigit() else None


def _place(queue: list[dict[str, Any]], identity: str) -> int:
    """Where a version goes in a queue: at the end, unless versions of the same partition read after it wait
    there (only a group delete held by the code before groups at its own resource alone, back from its tier,
    meets that: at the other resources it goes before what arrived after it)."""
    mine = _position(identity)
    for index, queued in enumerate(queue):
        theirs = _position(str(queued["identity"]))
        if mine is not None and theirs is not None and theirs[0] == mine[0] and theirs[1] > mine[1]:
            return index
    return len(queue)


def _encode(item: Queued) -> dict[str, Any]:
    return {
        "identity": item.identity,
        "key": base64.b64encode(item.key).decode() if item.key is not None else None,
        "value": base64.b64encode(item.value).decode(),
        "origin": list(item.origin),
        **({"group": list(item.group)} if item.group else {}),
        **({"headers": [[n, base64.b64encode(v).decode()] for n, v in item.headers]} if item.headers else {}),
    }


def _decode(raw: dict[str, Any]) -> Queued:
    topic, partition, offset = raw["origin"]
    key = base64.b64decode(raw["key"]) if raw.get("key") is not None else None
    origin = (str(topic), int(partition), int(offset))
    headers = tuple((str(n), base64.b64decode(v)) for n, v in raw.get("headers") or ())
    return Queued(raw["identity"], key, base64.b64decode(raw["value"]), origin, tuple(raw.get("group") or ()), headers)


async def write_in_order(
    order: SinkOrder,
    ref: str,
    head: Queued,
    attempt: Callable[[Queued, bool], Awaitable[Outcome]],
    now_ms: int,
    *,
    skip_head: bool = False,
) -> list[tuple[str, Outcome]]:
    """Write the head, then the versions queued behind it, in order, until one does not go through.

    attempt(item, is_head) writes one version and routes its failure. skip_head resolves the head
    without writing it (an operator discarded its dead letter). A group releases the queue of every
    resource it writes; each queue goes on in its own order. What each attempt came to, in order.
    """
    outcomes: list[tuple[str, Outcome]] = []
    turns: deque[tuple[str, Queued, bool]] = deque([(ref, head, True)])
    while turns:
        at, item, is_head = turns.popleft()
        outcome: Outcome = "written" if is_head and skip_head else await attempt(item, is_head)
        outcomes.append((item.identity, outcome))
        for r in item.refs(at):
            if not order.holds_for(r, item.identity):  # held by another (an entry of the code before groups)
                continue
            if outcome in ("written", "conflict"):
                following = order.written(r, item.identity)
                if following is not None:
                    turns.append((r, following, False))
            else:
                order.failed(r, item.identity, "dead" if outcome == "dead" else "retrying", now_ms)
    return outcomes
