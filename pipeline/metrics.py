"""Prometheus metrics (DESIGN.md decision 12). Labels are bounded: site, target, resource type, stage,
error class; never a patient or resource id."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "DEAD_LETTERS",
    "END_TO_END_LATENCY",
    "LAST_SUCCESS",
    "NORMALIZED",
    "PARKED",
    "RETRIES",
    "WRITES",
]

NORMALIZED = Counter(
    "cdrsync_normalized_total",
    "Source changes normalized, by outcome (normalized, filtered, tombstone, failed)",
    ["site", "resource_type", "outcome"],
)
WRITES = Counter(
    "cdrsync_writes_total",
    "Writes to a target, by result (succeeded, failed) and error class",
    ["site", "target", "resource_type", "result", "error_class"],
)
END_TO_END_LATENCY = Histogram(
    "cdrsync_end_to_end_latency_seconds",
    "Source commit to target acknowledgement",
    ["site", "target", "resource_type"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
LAST_SUCCESS = Gauge(
    "cdrsync_last_successful_write_timestamp_seconds",
    "Unix time of the last acknowledged write per route",
    ["site", "target"],
)
RETRIES = Counter("cdrsync_retries_total", "Records sent to a retry tier", ["stage", "tier", "error_class"])
DEAD_LETTERS = Counter("cdrsync_dead_letters_total", "Records sent to the dead-letter topic", ["stage", "error_class"])
PARKED = Counter(
    "cdrsync_parked_total",
    "Resources parked until a referenced resource is released",
    ["site", "resource_type"],
)

HELD = Counter(
    "cdrsync_held_total", "Records held because their patient has no shared identifier yet", ["site", "resource_type"]
)
HELD_RELEASED = Counter("cdrsync_held_released_total", "Held records released when the identifier arrived", ["site"])
IDENTITY_REVIEWS = Counter(
    "cdrsync_identity_reviews_total", "Patient identity changes sent to review instead of being applied", ["site"]
)
