"""Debezium change events (JSON converter, schemas disabled) → ChangeEvent."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

from .errors import EnvelopeError

__all__ = ["UNAVAILABLE_VALUE", "ChangeEvent", "decode_temporal", "parse_envelope", "resolve_toast"]

# Debezium's placeholder for a TOASTed column an UPDATE did not change (unavailable.value.placeholder).
UNAVAILABLE_VALUE = "__debezium_unavailable_value"

Op = Literal["c", "u", "d", "r"]
_OPS = {"c", "u", "d", "r"}


@dataclass(frozen=True)
class ChangeEvent:
    """One row change as Debezium reported it."""

    op: Op
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    lsn: int | None
    commit_ts_ms: int  # source.ts_ms: when the change was committed at the source database
    captured_ts_ms: int  # ts_ms: when Debezium processed it
    database: str
    schema: str
    table: str
    snapshot: bool

    @property
    def row(self) -> dict[str, Any]:
        """The row's state after the change, or before it for a delete."""
        row = self.before if self.op == "d" else self.after
        assert row is not None
        return row


def _as_object(value: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        decoded = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"value is not JSON: {exc}") from None
    if not isinstance(decoded, dict):
        raise EnvelopeError("value is not a JSON object")
    return decoded


def parse_envelope(value: bytes | str | dict[str, Any] | None) -> ChangeEvent | None:
    """Parse a Debezium value; None for a tombstone (the null value that follows a delete)."""
    if value is None:
        return None
    event = _as_object(value)
    if "payload" in event and "op" not in event:  # JSON converter with schemas enabled
        event = event["payload"] or {}
    op = event.get("op")
    if op not in _OPS:
        raise EnvelopeError(f"unsupported op {op!r} (expected one of c, u, d, r)")
    source = event.get("source")
    if not isinstance(source, dict):
        raise EnvelopeError("missing 'source' block")
    before, after = event.get("before"), event.get("after")
    if op == "d" and not isinstance(before, dict):
        raise EnvelopeError("delete without a 'before' image")
    if op != "d" and not isinstance(after, dict):
        raise EnvelopeError(f"op {op!r} without an 'after' image")
    try:
        commit_ts = int(source["ts_ms"])
        captured_ts = int(event.get("ts_ms") or commit_ts)
        lsn = source.get("lsn")
        return ChangeEvent(
            op=op,
            before=before if isinstance(before, dict) else None,
            after=after if isinstance(after, dict) else None,
            lsn=int(lsn) if lsn is not None else None,
            commit_ts_ms=commit_ts,
            captured_ts_ms=captured_ts,
            database=str(source.get("db", "")),
            schema=str(source.get("schema", "")),
            table=str(source.get("table", "")),
            snapshot=str(source.get("snapshot", "false")) not in ("false", "False", ""),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"malformed 'source' block: {exc!r}") from None


def resolve_toast(event: ChangeEvent, column: str) -> Any:
    """A column's value after the change, taking it from 'before' when Debezium sent the placeholder."""
    value = event.row.get(column)
    if value != UNAVAILABLE_VALUE:
        return value
    previous = (event.before or {}).get(column)
    if previous is None or previous == UNAVAILABLE_VALUE:
        raise EnvelopeError(
            f"column {column!r} is an unchanged TOAST value and no full 'before' image carries it "
            "(set REPLICA IDENTITY FULL on the table)"
        )
    return previous


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TemporalKind = Literal["date", "timestamp", "micro_timestamp", "nano_timestamp", "zoned_timestamp"]


def decode_temporal(value: int | str, kind: TemporalKind) -> datetime:
    """A temporal column as Debezium's PostgreSQL connector encodes it (time.precision.mode=adaptive).

    date → io.debezium.time.Date (days since the epoch); timestamp(0-3) → Timestamp (ms);
    timestamp(4-6) → MicroTimestamp (µs); NanoTimestamp (ns); timestamptz → ZonedTimestamp (ISO-8601
    text in UTC). Without schemas in the message the kind cannot be inferred from an int, so callers say it.
    """
    try:
        if kind == "zoned_timestamp":
            parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        number = int(value)
    except (TypeError, ValueError):
        raise EnvelopeError(f"{value!r} is not a Debezium {kind}") from None
    if kind == "date":
        return _EPOCH + timedelta(days=number)
    divisor = {"timestamp": 1_000, "micro_timestamp": 1_000_000, "nano_timestamp": 1_000_000_000}[kind]
    return _EPOCH + timedelta(seconds=number // divisor, microseconds=(number % divisor) * 1_000_000 // divisor)
