"""Metrics of the trigger and back-flow steps (kept apart from metrics.py, which other stages own).

Labels are bounded: site, target, resource type, outcome; never a patient or resource id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

__all__ = [
    "BACKFLOW",
    "CAPTURE_LAST_SUCCESS",
    "CAPTURE_POLLS",
    "CAPTURE_REQUEST_IDS",
    "TRIGGER_SELECTIONS",
    "WRITEBACK_WAITING",
]

TRIGGER_SELECTIONS = Counter(
    "cdrsync_trigger_selections_total",
    "Records on a triggered route by outcome: sent (selected when it came), backfilled (sent from state when "
    "a flag became active), held (kept in state: no active tumour-board flag selects it)",
    ["site", "target", "resource_type", "outcome"],
)
BACKFLOW = Counter(
    "cdrsync_backflow_total",
    "Central changes flowing back to hospitals by outcome: written_back, failed, no_hospital (patient unknown "
    "to every hospital), echo_suppressed (a change cdrsync itself made, not sent back), captured",
    ["site", "target", "resource_type", "outcome"],
)
WRITEBACK_WAITING = Gauge(
    "cdrsync_writeback_waiting",
    "Central changes read for a hospital and not yet written there (or dead-lettered): its write-back lane",
    ["target"],
)
CAPTURE_POLLS = Counter(
    "cdrsync_capture_polls_total",
    "Polls of a capture site's _history (central's own changes) by result (succeeded, failed)",
    ["site", "result"],
)
CAPTURE_REQUEST_IDS = Gauge(
    "cdrsync_capture_request_ids_kept",
    "1 while a capture site's server gets cdrsync's X-Request-ID (its own writes told from edits there by request "
    "id), 0 while it does not (by source URI alone: an edit that writes meta.source back is missed), -1 when "
    "the server does not say",
    ["site"],
)
CAPTURE_LAST_SUCCESS = Gauge(
    "cdrsync_capture_last_success_timestamp_seconds",
    "Unix time of the last complete poll of a capture site (set to the start time until the first succeeds)",
    ["site"],
)
