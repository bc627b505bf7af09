"""Demo and test data: FHIR bundles loaded into the site databases, and a summary of the central CDR."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg

from .config import SiteConfig
from .ids import target_id
from .resources import SUPPORTED_TYPES

__all__ = ["DEMO_ASSIGNMENT", "Row", "bundle_rows", "site_dsn", "upsert_rows"]

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fhir-converter"
# Which sample messages each demo hospital received; several carry the same patient, so later ones
# arrive as updates of rows already there.
DEMO_ASSIGNMENT = {
    "site-a": ["ADT-A01-01", "ADT-A08-01", "ORM-O01-01", "OML-O21-01", "RDE-O11-01", "VXU-V04-01"],
    "site-b": ["LAB-ORU-1", "MDM-T02-01", "ORU-R01-01", "SIU-S12-01"],
}


@dataclass(frozen=True)
class Row:
    """One row of a site's fhir.resource table."""

    resource_type: str
    id: str
    content: dict[str, Any]


def bundle_rows(path: Path, types: Iterable[str] = SUPPORTED_TYPES) -> list[Row]:
    """The resources of a bundle whose type the pipeline carries, in bundle order."""
    wanted = set(types)
    bundle = orjson.loads(path.read_bytes())
    rows = []
    for index, entry in enumerate(bundle.get("entry", [])):
        resource = entry.get("resource", {})
        if resource.get("resourceType") in wanted:
            # A hospital row always has an id; a bundle entry may lack one (VXU-V04-01's DocumentReference).
            source_id = resource.get("id") or f"{path.stem}-{index}"
            rows.append(Row(resource["resourceType"], source_id, resource))
    return rows


def site_dsn(site: SiteConfig, host: str, port: int, user: str, password: str | None) -> str:
    """libpq connection string for a site's source database."""
    assert site.source is not None
    secret = f" password={password}" if password else ""
    return f"host={host} port={port} user={user} dbname={site.source.database}{secret}"


def upsert_rows(dsn: str, rows: Iterable[Row], *, table: str = "fhir.resource") -> int:
    """Insert or update rows (version + 1 on update) in one transaction; returns the row count."""
    count = 0
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for row in rows:
            cur.execute(
                f"INSERT INTO {table} (resource_type, id, version, content) VALUES (%s, %s, 1, %s) "
                f"ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
                f"version = {table}.version + 1, updated_at = now()",
                (row.resource_type, row.id, orjson.dumps(row.content).decode()),
            )
            count += 1
    return count


def source_rows(dsn: str, *, table: str = "fhir.resource") -> list[tuple[str, str, float]]:
    """(resource_type, id, updated_at epoch seconds) of every row in a site table."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT resource_type, id, extract(epoch from updated_at) FROM {table}")
        return [(t, i, float(ts)) for t, i, ts in cur.fetchall()]


def expected_targets(site: str, rows: Iterable[tuple[str, str, float]]) -> dict[str, float]:
    """Target reference → source commit time, for the rows a site holds."""
    return {f"{t}/{target_id(site, t, i)}": ts for t, i, ts in rows}


def type_counts(refs: Iterable[str]) -> Counter[str]:
    """Count references by resource type."""
    return Counter(ref.split("/", 1)[0] for ref in refs)


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def now() -> float:
    """Wall-clock seconds (a seam for the summary's elapsed time)."""
    return time.time()
