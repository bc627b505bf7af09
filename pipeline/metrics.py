"""Prometheus metrics (DESIGN.md decision 12). Labels are bounded: site, target, resource type, stage,
error class; never a patient or resource id."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "BREAKER_OPEN",
    "BUNDLES",
    "CONFLICTS",
    "DEAD_LETTERS",
    "END_TO_END_LATENCY",
    "HELD_BEHIND",
    "HELD_RECORDS",
    "LAST_SUCCESS",
    "NORMALIZED",
    "PARKED",
    "READY",
    "RETRIES",
    "STAGE_BATCHES",
    "STAGE_BUSY_SECONDS",
    "STAGE_SECONDS",
    "TARGET_OUTAGES",
    "WRITES",
    "MemoryCollector",
    "VolumeCollector",
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
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 900, 1800, 3600),
)
STAGE_SECONDS = Histogram(
    "cdrsync_stage_seconds",
    "Time a record spends at one stage of the worker, by part: wait = from the record's Kafka timestamp to the"
    " stage taking it into a batch (the producer, the broker, the fetch, the hand-over, and any lag); handle = from"
    " then to its batch being done (outputs acknowledged by Kafka, tables applied, writes answered)",
    ["stage", "part"],
    buckets=(
        0.0005,
        0.001,
        0.002,
        0.003,
        0.004,
        0.005,
        0.0075,
        0.01,
        0.015,
        0.02,
        0.03,
        0.05,
        0.075,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        300,
        1800,
    ),
)
STAGE_BATCHES = Counter(
    "cdrsync_stage_batches_total",
    'Batches a stage of the worker has handled; its records (cdrsync_stage_seconds_count{part="handle"}) divided'
    " by this are its batch size",
    ["stage"],
)
STAGE_BUSY_SECONDS = Counter(
    "cdrsync_stage_busy_seconds_total",
    "Time a stage of the worker spent handling its batches (from taking a batch to being done with it). Its rate"
    " is the share of the time the stage was busy: a stage near 1 is the one the others wait for",
    ["stage"],
)
LAST_SUCCESS = Gauge(
    "cdrsync_last_successful_write_timestamp_seconds",
    "Unix time of the last acknowledged write per route",
    ["site", "target"],
)
RETRIES = Counter(
    "cdrsync_retries_total",
    "Records sent to a retry tier (tier: 0 = the first of topics.yaml's retry_tiers)",
    ["stage", "site", "target", "tier", "error_class"],
)
DEAD_LETTERS = Counter(
    "cdrsync_dead_letters_total",
    "Records sent to the dead-letter topic (site/target empty when the record could not be read)",
    ["stage", "site", "target", "error_class"],
)
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
IDENTITY_DECISIONS = Counter(
    "cdrsync_identity_decisions_total",
    "Identity reviews closed, by how: accepted, rejected (by a reviewer), withdrawn (by the hospital)",
    ["site", "action"],
)

IDENTITY_MOVES = Counter(
    "cdrsync_identity_moves_total",
    "Resources moved to another central Patient after an accepted identity review, by outcome: moved (written "
    "there), redirected (on their way to the previous Patient, sent on), overtaken (a later review emptied the "
    "Patient moved to: nothing moved); a resource the target refused makes the move a dead letter (move_refused)",
    ["site", "target", "outcome"],
)

BUNDLES = Counter(
    "cdrsync_bundles_total",
    "Transaction bundles the sink sent (one patient's upserts), by result: applied, or split into single writes",
    ["target", "result"],
)
CONFLICTS = Counter(
    "cdrsync_conflicts_total",
    "Changes not applied because the target resource changed since cdrsync last wrote it",
    ["site", "target", "resource_type"],
)
HELD_RECORDS = Gauge(
    "cdrsync_held_records",
    "Records waiting in this worker's tables now, by reason (missing_identifier, identity_review, reference)",
    ["site", "reason"],
)
HELD_BEHIND = Counter(
    "cdrsync_held_behind_total",
    "Versions queued behind an earlier version of the same resource that waits in a retry tier or the dead letters",
    ["site", "target", "resource_type"],
)
BREAKER_OPEN = Gauge(
    "cdrsync_target_breaker_open",
    "1 while the target cannot be reached and the sink holds its writes (circuit breaker open)",
    ["target"],
)
TARGET_OUTAGES = Counter("cdrsync_target_outages_total", "Times the circuit breaker of a target opened", ["target"])
READY = Gauge("cdrsync_ready", "1 when /readyz answers ready (partitions assigned, tables recovered, target up)")


class VolumeCollector(Collector):
    """Used and available bytes of the file systems holding the given paths (disk-pressure alerts)."""

    def __init__(self, volumes: Mapping[str, Path]) -> None:
        self.volumes = dict(volumes)

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        used = GaugeMetricFamily("cdrsync_volume_used_bytes", "Bytes used on the volume", labels=["volume"])
        available = GaugeMetricFamily(
            "cdrsync_volume_available_bytes", "Bytes still available to cdrsync on the volume", labels=["volume"]
        )
        return used, available

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The metric names, without touching the disk."""
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per volume whose path exists."""
        used, available = self._families()
        for name, path in sorted(self.volumes.items()):
            try:
                usage = shutil.disk_usage(path)
            except OSError:
                continue
            used.add_metric([name], float(usage.used))
            available.add_metric([name], float(usage.free))
        yield used
        yield available


class MemoryCollector(Collector):
    """Where the worker's memory is, by part (pipeline/memory.py), read when /metrics is scraped."""

    def __init__(self, read: Callable[[], Mapping[str, int]]) -> None:
        self.read = read

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "cdrsync_worker_memory_bytes",
            "Bytes the worker holds, by part: heap_in_use, heap_mapped, heap_free (the C heap), block_cache "
            "(RocksDB's, memtables charged to it included), block_cache_pinned, memtables, table_readers",
            labels=["part"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The metric name, without reading anything."""
        yield self._family()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per part the reader reports."""
        family = self._family()
        for part, value in sorted(self.read().items()):
            family.add_metric([part], float(value))
        yield family
