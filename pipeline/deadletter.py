"""Headers of dead-letter and retry records: the original record travels unchanged as the value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CdrsyncError

__all__ = [
    "DISCARD_HEADER",
    "REPLAY_HEADER",
    "FailureInfo",
    "failure_headers",
    "failure_info",
    "kept_while_queued",
    "parse_failure_headers",
    "retry_schedule",
]

Headers = list[tuple[str, bytes]]
DISCARD_HEADER = "cdrsync-discard"  # `cdrsync dlq discard`: resolve a dead letter without writing it
REPLAY_HEADER = "cdrsync-replay-of"  # `cdrsync dlq replay`: the dead letter's id (partition:offset)
_PREFIX = "cdrsync-"


@dataclass(frozen=True)
class FailureInfo:
    """Why and where a record failed."""

    stage: str
    error_class: str
    message: str
    attempts: int
    first_failure_ms: int
    last_failure_ms: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    due_ms: int = 0
    tier: int = 0


def failure_info(
    stage: str,
    error: BaseException,
    *,
    attempts: int,
    now_ms: int,
    origin: tuple[str, int, int],
    previous: FailureInfo | None = None,
) -> FailureInfo:
    """Failure details for a record, carrying the first failure time and attempts over from earlier tries."""
    error_class = error.error_class if isinstance(error, CdrsyncError) else "internal"
    message = str(error) if isinstance(error, CdrsyncError) else f"{type(error).__name__}: {error}"
    return FailureInfo(
        stage=stage,
        error_class=error_class,
        message=message[:1000],
        attempts=attempts + (previous.attempts if previous else 0),
        first_failure_ms=previous.first_failure_ms if previous else now_ms,
        last_failure_ms=now_ms,
        origin_topic=previous.origin_topic if previous else origin[0],
        origin_partition=previous.origin_partition if previous else origin[1],
        origin_offset=previous.origin_offset if previous else origin[2],
        tier=previous.tier if previous else 0,
    )


def _header_name(field: str) -> str:
    """The Kafka header of a FailureInfo field (cdrsync-origin-offset for origin_offset)."""
    return f"{_PREFIX}{field.replace('_', '-')}"


def kept_while_queued(headers: Sequence[tuple[str, bytes]]) -> tuple[tuple[str, bytes], ...]:
    """The headers a record keeps while it waits in the sink's queue: its failure (failure_headers wrote them),
    and an operator's discard."""
    names = {_header_name(field) for field in FailureInfo.__annotations__} | {DISCARD_HEADER}
    return tuple((name, value) for name, value in headers if name in names)


def failure_headers(info: FailureInfo) -> Headers:
    """Kafka headers for a failure (all values UTF-8 text)."""
    return [(_header_name(key), str(value).encode()) for key, value in info.__dict__.items()]


def parse_failure_headers(
    headers: Sequence[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None,
) -> FailureInfo | None:
    """FailureInfo from Kafka headers, None if the record never failed."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    values = {
        k.removeprefix(_PREFIX).replace("-", "_"): v.decode() if isinstance(v, bytes) else str(v)
        for k, v in items
        if k.startswith(_PREFIX) and v is not None
    }
    if "stage" not in values:
        return None
    ints = {
        "attempts",
        "first_failure_ms",
        "last_failure_ms",
        "origin_partition",
        "origin_offset",
        "due_ms",
        "tier",
    }
    fields: dict[str, Any] = {
        k: int(v) if k in ints else v for k, v in values.items() if k in FailureInfo.__annotations__
    }
    return FailureInfo(**fields)


def retry_schedule(
    previous: FailureInfo | None, delays: Sequence[float], *, stay_until_ms: int | None = None, now_ms: int = 0
) -> tuple[int, float] | None:
    """(tier, delay in seconds) of a record's next retry, None when the tiers are used up (dead letter).

    A record that never went through a tier goes to the first; each failure after a tier moves it one
    on. A replayed dead letter carries tier -1, so it starts over at the first tier. (A target's
    Retry-After is honoured by the in-process retries, see pipeline/sink.py: a tier's delay is fixed,
    so the records of a tier fall due in the order they arrive.) With `stay_until_ms`, a record past the
    last tier goes round it again until then (a failure known to end by itself, `AwaitedWriteError`).
    """
    tier = previous.tier + 1 if previous is not None and previous.due_ms else 0
    if tier >= len(delays):
        if stay_until_ms is not None and now_ms < stay_until_ms and delays:
            return len(delays) - 1, float(delays[-1])
        return None
    return tier, float(delays[tier])
