"""Central capture wiring: poll each capture site's `_history` (pipeline/capture.py) on the leader worker.

One worker of the group (Faust's leader) polls, so two workers never race on the cursor. Events are
acknowledged by Kafka before the cursor (PostgreSQL `cdrsync.capture_cursor`) moves past them.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import orjson
import psycopg
from faust.types import TopicT

from pipeline.capture import (
    CAPTURE_CURSOR_DDL,
    CaptureCursor,
    HistoryEntry,
    RequestIds,
    advance,
    change_event,
    history_entries,
    is_own_change,
    new_entries,
    query_since,
)
from pipeline.config import SiteConfig
from pipeline.errors import CdrsyncError, RejectedByTargetError
from pipeline.fhirclient import FhirClient
from pipeline.flowmetrics import BACKFLOW, CAPTURE_LAST_SUCCESS, CAPTURE_POLLS, CAPTURE_REQUEST_IDS
from pipeline.resources import patient_part

from .app import app, config, settings
from .routing import deliver

__all__ = ["capture_history"]

log = logging.getLogger("cdrsync.capture")
_PAGE = 200
_topics: dict[str, TopicT] = {site.site: app.topic(config.source_topic(site)) for site in config.capture_sites()}
_clients: dict[str, FhirClient] = {}
_state: dict[str, Any] = {}
_started: set[str] = set()
_request_ids: dict[str, RequestIds] = {}
_CLOCK_MARGIN_SECONDS = 5.0  # between the worker's clock and the server's lastUpdated
_INTERVAL = min((s.capture.poll_seconds for s in config.capture_sites() if s.capture), default=60.0)


async def _cursor_db() -> psycopg.AsyncConnection[Any]:
    connection = _state.get("db")
    if connection is None or connection.closed:
        connection = await psycopg.AsyncConnection.connect(settings.pg_dsn(settings.audit_database), autocommit=True)
        async with connection.cursor() as cursor:
            await cursor.execute(CAPTURE_CURSOR_DDL)
        _state["db"] = connection
    return connection


async def _load_cursor(site: str, resource_type: str) -> CaptureCursor:
    async with (await _cursor_db()).cursor() as cursor:
        await cursor.execute(
            "SELECT since, seen FROM cdrsync.capture_cursor WHERE site = %s AND resource_type = %s",
            (site, resource_type),
        )
        row = await cursor.fetchone()
    return CaptureCursor(since=row[0], seen=list(row[1])) if row else CaptureCursor()


async def _store_cursor(site: str, resource_type: str, cursor_: CaptureCursor) -> None:
    async with (await _cursor_db()).cursor() as cursor:
        await cursor.execute(
            "INSERT INTO cdrsync.capture_cursor (site, resource_type, since, seen) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (site, resource_type) DO UPDATE SET since = EXCLUDED.since, seen = EXCLUDED.seen, "
            "updated_at = now()",
            (site, resource_type, cursor_.since, orjson.dumps(cursor_.seen).decode()),
        )


async def _history(client: FhirClient, resource_type: str, since: str | None) -> list[HistoryEntry]:
    """Every version since the cursor, all pages."""
    path = f"{resource_type}/_history?_count={_PAGE}" + (f"&_since={quote(since, safe='')}" if since else "")
    entries: list[HistoryEntry] = []
    while path:
        bundle = await client.get_json(path)
        entries += history_entries(bundle)
        path = next((link["url"] for link in bundle.get("link") or [] if link.get("relation") == "next"), "")
    return entries


async def _previous(client: FhirClient, entry: HistoryEntry) -> dict[str, Any] | None:
    """The version before this one: what a deletion deleted, and for an update the patient it named before
    (pipeline/normalize.py `_withdrawn`). None for a first version, or one that follows a deletion."""
    if entry.version <= 1:
        return None
    try:
        previous = await client.get_json(f"{entry.resource_type}/{entry.resource_id}/_history/{entry.version - 1}")
    except RejectedByTargetError as error:
        if entry.resource is None or error.status not in (404, 410):
            raise
        if error.status == 404:  # 410: the version before was a deletion (re-created since): nothing to compare
            log.warning(
                "%s/%s: version %d is not in the server's history; whether version %d names another patient "
                "cannot be told, and a decision moved to another patient stays at the previous one's hospitals",
                entry.resource_type,
                entry.resource_id,
                entry.version - 1,
                entry.version,
            )
        return None
    # An update needs only the patient the version before named (pipeline/normalize.py `_withdrawn`): its
    # content would double the event's size.
    return previous if entry.resource is None else patient_part(previous)


async def _check_request_ids(site: SiteConfig, client: FhirClient) -> RequestIds:
    """Whether the server gets cdrsync's X-Request-ID, checked before each poll (one small GET). While it does
    not, versions are judged by source URI alone: no echo of cdrsync's own writes, but an application's edit
    that writes meta.source back is taken for cdrsync's; the gauge is 0 and CaptureRequestIdsLost alerts."""
    kept = await client.request_ids_kept()
    first = site.site not in _request_ids  # the first check that got an answer
    state = _request_ids.setdefault(site.site, RequestIds())
    was = state.kept
    state.note(kept, time.time(), margin=2 * _INTERVAL + _CLOCK_MARGIN_SECONDS)
    CAPTURE_REQUEST_IDS.labels(site.site).set({True: 1, False: 0, None: -1}[state.kept])
    if state.kept is False and was is not False:
        log.error(
            "%s does not receive cdrsync's X-Request-ID header (a proxy drops or replaces it?): until it does, "
            "an edit there that writes meta.source back is taken for cdrsync's own write and does not flow back",
            client.base_url,
        )
    elif state.kept is None and first:
        log.warning(
            "%s does not say which request id it used: versions there are told from cdrsync's writes by their "
            "source URI alone (an edit that writes meta.source back is taken for cdrsync's)",
            client.base_url,
        )
    elif state.kept and was is False:
        log.warning("%s receives cdrsync's X-Request-ID again", client.base_url)
    return state


def _written_at(entry: HistoryEntry, judged: dict[str, Any] | None) -> str:
    return str(((judged or {}).get("meta") or {}).get("lastUpdated") or entry.last_updated)


async def _capture_type(site: SiteConfig, client: FhirClient, ids: RequestIds, resource_type: str) -> None:
    assert site.capture is not None
    cursor = await _load_cursor(site.site, resource_type)
    lookback_ms = int(site.capture.lookback_seconds * 1000)
    fresh = new_entries(await _history(client, resource_type, query_since(cursor, lookback_ms)), cursor, lookback_ms)
    emitted = 0
    for entry in fresh:
        previous = await _previous(client, entry)
        judged = entry.resource or previous
        if not is_own_change(judged, site.site, by_request_id=ids.by_request_id(_written_at(entry, judged))):
            BACKFLOW.labels(site.site, "", resource_type, "echo_suppressed").inc()
            continue
        key, value = change_event(site.site, site.capture.schema_name, site.capture.table, entry, previous)
        await deliver(_topics[site.site], key, value)
        BACKFLOW.labels(site.site, "", resource_type, "captured").inc()
        emitted += 1
    if fresh:
        await _store_cursor(site.site, resource_type, advance(cursor, fresh, lookback_ms))
        log.info(
            "%s at %s: %d new version(s), %d captured, %d written there by cdrsync for a hospital (skipped)",
            resource_type,
            site.site,
            len(fresh),
            emitted,
            len(fresh) - emitted,
        )


@app.timer(interval=_INTERVAL, on_leader=True)
async def capture_history() -> None:
    """Poll every capture site's history once; a failure is logged, counted and retried on the next tick."""
    for site in config.capture_sites():
        assert site.target is not None
        if site.site not in _started:  # the staleness alert counts from here until a first success
            _started.add(site.site)
            CAPTURE_LAST_SUCCESS.labels(site.site).set(time.time())
        client = _clients.setdefault(site.site, FhirClient(site.target))
        try:
            ids = await _check_request_ids(site, client)
            for resource_type in site.resource_types:
                await _capture_type(site, client, ids, resource_type)
        except (CdrsyncError, psycopg.Error) as error:  # the cursor did not move: next tick retries
            CAPTURE_POLLS.labels(site.site, "failed").inc()
            log.error("capture at %s failed: %s: %s", site.site, type(error).__name__, error)
            if isinstance(error, psycopg.Error):
                _state.pop("db", None)  # reconnect next time
            continue
        except Exception:  # a malformed answer must not crash the worker; CentralCaptureStale alerts
            CAPTURE_POLLS.labels(site.site, "failed").inc()
            log.exception("capture at %s failed unexpectedly", site.site)
            continue
        CAPTURE_POLLS.labels(site.site, "succeeded").inc()
        CAPTURE_LAST_SUCCESS.labels(site.site).set(time.time())
