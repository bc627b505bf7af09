"""Capture of the central CDR's own changes: its FHIR `_history`, turned into Debezium-shaped change events.

Why not Debezium here: the central HAPI server keeps its data in H2 (compose/fhir), which Debezium cannot
read. Moving HAPI onto the stack's PostgreSQL and capturing HAPI's tables (HFJ_RES_VER) would tie the
pipeline to HAPI's internal schema (resource text inline or in LOBs, compressed or not, changing across
HAPI versions), and would not work for a central CDR that is not HAPI. The FHIR `_history` interaction
is standard (FHIR R4 3.1.0.4.x) and works against any conformant server, so cdrsync polls it instead.

What the poller guarantees, like Debezium:
  * Nothing missed: a durable cursor (PostgreSQL table `cdrsync.capture_cursor` in the central database)
    holds the last `meta.lastUpdated` read and the versions already emitted at that instant; `_since` is
    inclusive, so an instant is re-read and its already emitted versions are skipped. The cursor moves only
    after Kafka acknowledged every event before it (at-least-once; downstream writes are idempotent).
  * Same shape: each version becomes one event on `cdc.<site>.<schema>.<table>` with Debezium's envelope
    (`before`, `after` with the `fhir` adapter's row columns, `source.ts_ms` = the version's lastUpdated,
    `op` c/u/d), so the normal normalize stage reads it. A delete carries the last version as `before`.
  * No echo: versions that cdrsync itself wrote (meta.tag urn:cdrsync:origin-site naming a hospital) are
    hospital data, not central's own changes, and are skipped (counted as echo_suppressed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .ids import CDRSYNC_REQUEST_PREFIX, CDRSYNC_SOURCE_PREFIX, ORIGIN_TAG_SYSTEM

__all__ = [
    "CAPTURE_CURSOR_DDL",
    "CaptureCursor",
    "HistoryEntry",
    "RequestIds",
    "advance",
    "change_event",
    "history_entries",
    "is_own_change",
    "new_entries",
    "query_since",
]


CAPTURE_CURSOR_DDL = """
CREATE SCHEMA IF NOT EXISTS cdrsync;
CREATE TABLE IF NOT EXISTS cdrsync.capture_cursor (
  site          text        NOT NULL,
  resource_type text        NOT NULL,
  since         text        NOT NULL,
  seen          jsonb       NOT NULL DEFAULT '[]',
  updated_at    timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (site, resource_type)
);
"""


@dataclass(frozen=True)
class HistoryEntry:
    """One version from a `_history` bundle."""

    resource_type: str
    resource_id: str
    version: int
    last_updated: str  # as the server wrote it (an instant)
    resource: dict[str, Any] | None  # None for a deleted version

    @property
    def key(self) -> str:
        """Type/id/_history/version: unique per version."""
        return f"{self.resource_type}/{self.resource_id}/_history/{self.version}"

    @property
    def at_ms(self) -> int:
        """lastUpdated in epoch milliseconds."""
        return _instant_ms(self.last_updated)


@dataclass
class CaptureCursor:
    """Where capture of one site's type stands: the newest instant read, and the versions seen from `lookback`
    before it on ("<Type/id/_history/n>@<epoch ms>"; a bare key, as older cursors kept it: seen at `since`)."""

    since: str | None = None
    seen: list[str] = field(default_factory=list)

    def seen_at(self) -> dict[str, int]:
        """Key → lastUpdated (epoch ms) of each version seen."""
        at_since = _instant_ms(self.since) if self.since else 0
        out = {}
        for item in self.seen:
            key, _, at = item.rpartition("@")
            out[key or item] = int(at) if key and at.isdigit() else at_since
        return out


def query_since(cursor: CaptureCursor, lookback_ms: int = 0) -> str | None:
    """The `_since` to ask for: `lookback_ms` before the newest instant read. A server may stamp a version's
    lastUpdated when its request starts and make it visible when it commits, after a version stamped later
    (HAPI does): read only from the newest instant, such a version would never be seen."""
    if cursor.since is None:
        return None
    if not lookback_ms:
        return cursor.since
    start = datetime.fromtimestamp((_instant_ms(cursor.since) - lookback_ms) / 1000, tz=UTC)
    return start.isoformat(timespec="milliseconds")


def _instant_ms(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def _version(value: Any) -> int:
    text = str(value or "").removeprefix('W/"').strip('"')
    return int(text) if text.isdigit() else 0


def history_entries(bundle: dict[str, Any]) -> list[HistoryEntry]:
    """The versions of a history bundle (any order), deletes included.

    A deleted version has no resource, so its instant is the entry's response.lastModified; a server that
    gives none (HAPI 8 does not) gets the bundle's own lastUpdated (when the server answered: at or after
    the deletion), else the present moment: never left out, which would lose the board's deletion.
    """
    answered = str((bundle.get("meta") or {}).get("lastUpdated") or "") or datetime.now(UTC).isoformat(
        timespec="milliseconds"
    )
    entries = []
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        request = entry.get("request") or {}
        response = entry.get("response") or {}
        if isinstance(resource, dict):
            meta = resource.get("meta") or {}
            rtype, rid = str(resource.get("resourceType")), str(resource.get("id"))
            version, updated = _version(meta.get("versionId")), str(meta.get("lastUpdated") or answered)
        else:  # a deleted version: only the request says what was deleted
            parts = str(request.get("url") or entry.get("fullUrl") or "").split("/")
            idx = parts.index("_history") if "_history" in parts else len(parts)
            rtype, rid = parts[idx - 2], parts[idx - 1]
            version = _version(response.get("etag")) or (int(parts[idx + 1]) if idx + 1 < len(parts) else 0)
            updated = str(response.get("lastModified") or answered)
            resource = None
        entries.append(HistoryEntry(rtype, rid, version, updated, resource))
    return entries


def new_entries(entries: list[HistoryEntry], cursor: CaptureCursor, lookback_ms: int = 0) -> list[HistoryEntry]:
    """Versions not emitted yet, oldest first (by lastUpdated, then version): the ones not seen, from
    `lookback_ms` before the cursor's instant on (query_since)."""
    since_ms = _instant_ms(cursor.since) if cursor.since else None
    seen = cursor.seen_at()
    fresh = [e for e in entries if since_ms is None or (e.at_ms >= since_ms - lookback_ms and e.key not in seen)]
    unique = {e.key: e for e in fresh}
    return sorted(unique.values(), key=lambda e: (e.at_ms, e.resource_type, e.resource_id, e.version))


def advance(cursor: CaptureCursor, emitted: list[HistoryEntry], lookback_ms: int = 0) -> CaptureCursor:
    """The cursor after the given versions were acknowledged by Kafka (or skipped): the newest instant read,
    and every version seen within `lookback_ms` of it."""
    if not emitted:
        return cursor
    newest = max(emitted, key=lambda e: e.at_ms)
    since = cursor.since
    if since is None or newest.at_ms > _instant_ms(since):
        since = newest.last_updated
    since_ms = _instant_ms(since)
    seen = {**cursor.seen_at(), **{e.key: e.at_ms for e in emitted}}
    kept = sorted(f"{key}@{at}" for key, at in seen.items() if at >= since_ms - lookback_ms)
    return CaptureCursor(since=since, seen=kept)


def is_own_change(resource: dict[str, Any] | None, site: str, *, by_request_id: bool = True) -> bool:
    """False for a version cdrsync wrote there on behalf of another site (loop prevention).

    Told by the version's meta.source, urn:cdrsync:site:<site>, which cdrsync sets on every write and a FHIR
    server keeps per version: any other source is the site's own change. HAPI appends "#" and the request's
    id, and cdrsync's requests carry ids of its own (ids.CDRSYNC_REQUEST_PREFIX): a version with cdrsync's
    source URI but another request id is an application's edit of a resource cdrsync wrote, read and
    written back whole (meta included), and it is the site's own change too. by_request_id False (the server
    did not get cdrsync's request ids when the version was written): the URI alone decides. The origin tags
    decide only when a server keeps no meta.source. HAPI keeps a resource's tags when it is updated, so a
    tumour board's edit of a resource cdrsync wrote there for a hospital still carries that hospital's tag:
    judged by its tags, the edit would never flow back.
    """
    meta = (resource or {}).get("meta") or {}
    source = meta.get("source")
    if isinstance(source, str) and source:
        uri, marked, request = source.partition("#")
        if not uri.startswith(CDRSYNC_SOURCE_PREFIX) or uri.removeprefix(CDRSYNC_SOURCE_PREFIX) == site:
            return True
        return by_request_id and bool(marked) and not request.startswith(CDRSYNC_REQUEST_PREFIX)
    tags = meta.get("tag") or []
    origins = {t.get("code") for t in tags if isinstance(t, dict) and t.get("system") == ORIGIN_TAG_SYSTEM}
    return not (origins - {site})


@dataclass
class RequestIds:
    """Whether a capture site's server gets cdrsync's request ids, as checked before each poll.

    While it does not (a proxy drops or replaces X-Request-ID), cdrsync's own writes there carry ids the
    server made, like an application's, so versions are judged by their source URI alone. Versions written
    up to `unmarked_until` (a Unix time: when the ids were first seen arriving again, plus a margin for the
    poll and the clocks) may still be such writes and are judged the same way.
    """

    kept: bool | None = None
    unmarked_until: float = 0.0

    def note(self, kept: bool | None, now: float, margin: float) -> None:
        """Record a check's outcome (None: the server does not say which id it used)."""
        if kept and self.kept is False:
            self.unmarked_until = now + margin
        self.kept = kept

    def by_request_id(self, last_updated: str) -> bool:
        """Whether a version written at `last_updated` (the server's instant) is judged by its request id."""
        if not self.kept:
            return False
        try:
            return _instant_ms(last_updated) / 1000 > self.unmarked_until
        except ValueError:
            return False


def _row(entry: HistoryEntry, resource: dict[str, Any], version: int) -> dict[str, Any]:
    return {
        "resource_type": entry.resource_type,
        "id": entry.resource_id,
        "version": version,
        "content": orjson.dumps(resource).decode(),
        "updated_at": entry.last_updated,
    }


def change_event(
    site: str, schema: str, table: str, entry: HistoryEntry, previous: dict[str, Any] | None, now_ms: int | None = None
) -> tuple[bytes, bytes]:
    """(key, value) of the Debezium-shaped change event of one version; `previous` is the version before it."""
    before = _row(entry, previous, entry.version - 1) if previous is not None else None
    if entry.resource is None:
        op, after = "d", None
        before = before or {"resource_type": entry.resource_type, "id": entry.resource_id, "version": entry.version}
    else:
        op, after = ("c" if entry.version <= 1 else "u"), _row(entry, entry.resource, entry.version)
    value = {
        "before": before,
        "after": after,
        "source": {
            "version": "cdrsync-fhir-history",
            "connector": "fhir-history",
            "name": f"cdc.{site}",
            "ts_ms": entry.at_ms,
            "snapshot": "false",
            "db": site,
            "schema": schema,
            "table": table,
            "lsn": None,
        },
        "op": op,
        "ts_ms": now_ms if now_ms is not None else int(time.time() * 1000),
    }
    key = {"resource_type": entry.resource_type, "id": entry.resource_id}
    return orjson.dumps(key), orjson.dumps(value)
