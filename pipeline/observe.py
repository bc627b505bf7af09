"""What the worker reports about its records: metric labels, log correlation fields, held counts, readiness.

Everything here is bounded and free of patient data: sites, targets, resource types, Kafka positions,
LSNs and deterministic target ids (uuid5 hashes), never names, birth dates or resource content.
"""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import Config
from .errors import CdrsyncError
from .records import NormalizedResource, RoutedResource, decode_any

__all__ = [
    "Readiness",
    "held_counts",
    "record_fields",
    "route_labels",
]


def route_labels(config: Config, topic: str, value: bytes | None) -> tuple[str, str]:
    """(site, target) of a record for metric labels; "" where the record does not say."""
    for site in config.source_sites():
        if config.source_topic(site) == topic:
            return site.site, ""
    if not value:
        return "", ""
    try:
        _, datum = decode_any(value)
    except CdrsyncError:
        return "", ""
    return str(datum.get("site") or ""), str(datum.get("target") or "")


def record_fields(record: NormalizedResource | RoutedResource) -> dict[str, Any]:
    """Log correlation fields of a record: where it came from at the source and in Kafka, where it goes."""
    fields: dict[str, Any] = {
        "site": record.site,
        "resource_type": record.resource_type,
        "source_topic": record.origin_topic,
        "source_partition": record.origin_partition,
        "source_offset": record.origin_offset,
        "source_lsn": record.source_lsn,
    }
    if isinstance(record, RoutedResource):
        fields["target"] = record.target
        fields["target_ref"] = record.target_ref
    return fields


async def held_counts(
    held: Iterable[tuple[str, list[Any]]],
    parked: Iterable[list[Mapping[str, Any]]],
    *,
    under_review: Callable[[str], bool] = lambda local: False,
    every: int = 256,
) -> Counter[tuple[str, str]]:
    """Records waiting now, by (site, reason).

    held:   the identity stage's "site|local patient" → records waiting for the shared identifier
            (missing_identifier), or for a person's decision on the patient's identity (identity_review:
            under_review tells which)
    parked: the order stage's park lists, whose entries carry the encoded record

    The worker counts its tables this way every 15 s, in its event loop. A back-load can park tens of
    thousands of records (about 12 µs each to decode, 0.6 s for 50 000, before reading them from RocksDB),
    so the count lets the loop run after every `every` table entries instead of holding up every stage
    for the whole scan.
    """
    counts: Counter[tuple[str, str]] = Counter()
    for n, (key, records) in enumerate(held, 1):
        reason = "identity_review" if under_review(key) else "missing_identifier"
        counts[(key.split("|", 1)[0], reason)] += len(records)
        if n % every == 0:
            await asyncio.sleep(0)
    for n, entries in enumerate(parked, 1):
        for entry in entries:
            counts[(_site_of_parked(entry), "reference")] += 1
        if n % every == 0:
            await asyncio.sleep(0)
    return counts


def _site_of_parked(entry: Mapping[str, Any]) -> str:
    try:
        _, datum = decode_any(base64.b64decode(entry["record"]))
    except (CdrsyncError, KeyError, TypeError, ValueError):
        return ""
    return str(datum.get("site") or "")


@dataclass(frozen=True)
class Readiness:
    """The three conditions of /readyz."""

    partitions_assigned: bool
    tables_recovered: bool
    target_reachable: bool

    @property
    def ready(self) -> bool:
        """Ready only when all three hold."""
        return self.partitions_assigned and self.tables_recovered and self.target_reachable

    def as_dict(self) -> dict[str, Any]:
        """The JSON body of /readyz."""
        return {
            "ready": self.ready,
            "checks": {
                "partitions_assigned": self.partitions_assigned,
                "tables_recovered": self.tables_recovered,
                "target_reachable": self.target_reachable,
            },
        }
