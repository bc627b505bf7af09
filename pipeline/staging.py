"""Table changes held back until the records a stage produced are acknowledged by Kafka."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

__all__ = ["Staged", "StagedBatch", "current", "pending", "staged_batch"]

_ABSENT = object()


class Staged(MutableMapping[str, Any]):
    """Changes to a table held back until `apply()`: the order stage applies them only after every
    record it released is acknowledged by Kafka. Table state may then lag what was sent (a replay
    sends it again, and writes are idempotent) but never runs ahead of it, which would let a
    replayed dependant overtake the resource it references."""

    def __init__(self, base: MutableMapping[str, Any]) -> None:
        batch = _batch.get()
        self.base = batch.overlay(base) if batch is not None else base
        self.changes: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        value = self.changes.get(key, _ABSENT)
        if value is _ABSENT:
            return self.base[key]
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.changes[key] = value

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.changes[key] = None

    def __contains__(self, key: object) -> bool:
        value = self.changes.get(key, _ABSENT)  # type: ignore[call-overload]
        return key in self.base if value is _ABSENT else value is not None

    def __iter__(self) -> Any:
        seen = set()
        for key in self.base:
            seen.add(key)
            if key in self:
                yield key
        yield from (k for k, v in self.changes.items() if v is not None and k not in seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def apply(self) -> None:
        """Write the held changes to the table (in a batch: to the batch, see StagedBatch)."""
        if isinstance(self.base, _Overlay):
            self.base.batch.note(self.base, self.changes)
            self.changes.clear()
            return
        for key, value in self.changes.items():
            if value is None:
                self.base.pop(key, None)
            else:
                self.base[key] = value
        self.changes.clear()


class _Overlay(Staged):
    """The changes a batch made to one table so far (never itself part of a batch)."""

    def __init__(self, base: MutableMapping[str, Any], batch: StagedBatch) -> None:
        self.base = base
        self.changes = {}
        self.batch = batch


class StagedBatch:
    """Table changes of several records processed one after the other, applied to the tables together once
    every output of all of them is acknowledged: each record sees the changes of the records before it
    (the Staged it makes reads through the batch's overlay), the tables themselves only acknowledged ones.

    Each change is kept with the context it was made in (context(): the record being processed; a
    Faust table writes its changelog to that record's partition), and applied in it (final_changes).
    """

    def __init__(self, context: Callable[[], Any] = lambda: None) -> None:
        self.overlays: dict[tuple[int, Any], _Overlay] = {}
        self.context = context
        self._final: dict[tuple[int, str], tuple[Any, MutableMapping[str, Any], Any]] = {}

    def _partition(self) -> Any:
        """The partition of the record being processed (None outside a worker): a table is one per partition."""
        return getattr(getattr(self.context(), "message", None), "partition", None)

    def overlay(self, base: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """The batch's changes to a table so far, in the partition of the record being processed: a batch holds
        records of several partitions, and one key may be in two of them (a patient's resources that moved from
        one central Patient to another, pipeline/patientmove.py), each its own."""
        if isinstance(base, Staged):  # already staged (an overlay, or a record's own Staged)
            return base
        key = (id(base), self._partition())
        if key not in self.overlays:
            self.overlays[key] = _Overlay(base, self)
        return self.overlays[key]

    def note(self, overlay: _Overlay, changes: dict[str, Any]) -> None:
        """A record's changes (None: deleted): visible to the records after it, kept for final_changes."""
        context = self.context()
        for key, value in changes.items():
            overlay.changes[key] = value
            self._final.pop((id(overlay), key), None)  # keep the order of the last changes
            self._final[(id(overlay), key)] = (context, overlay.base, value)

    def final_changes(self) -> Iterator[tuple[Any, MutableMapping[str, Any], str, Any]]:
        """(context, table, key, value or None for a delete): the last change of each key, in order."""
        for (_, key), (context, table, value) in self._final.items():
            yield context, table, key, value


_batch: ContextVar[StagedBatch | None] = ContextVar("cdrsync_staged_batch", default=None)


@contextmanager
def staged_batch(context: Callable[[], Any] = lambda: None) -> Iterator[StagedBatch]:
    """Within it, every Staged made reads and applies through the batch (see StagedBatch)."""
    batch = StagedBatch(context)
    token = _batch.set(batch)
    try:
        yield batch
    finally:
        _batch.reset(token)


def current(table: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A table as the records before this one left it: through the batch's changes when in a batch."""
    batch = _batch.get()
    return batch.overlay(table) if batch is not None else table


def pending(table: MutableMapping[str, Any]) -> list[tuple[str, Any]]:
    """The changes the batch being processed made to a table and has not applied yet (None: deleted), as
    (key, value) in every partition (a key may change in two)."""
    batch = _batch.get()
    if batch is None:
        return []
    return [item for (base, _), o in batch.overlays.items() if base == id(table) for item in o.changes.items()]
