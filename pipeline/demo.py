"""Demo and test data: FHIR bundles loaded into the site databases, and a summary of the central CDR."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg

from .config import SiteConfig
from .identity import route_resource
from .ids import target_id
from .records import NormalizedResource, canonical_hash
from .resources import SUPPORTED_TYPES, patient_reference
from .settings import pg_dsn
from .trigger import TRIGGER_ALL, TriggerTables, select_records

__all__ = [
    "DEMO_ASSIGNMENT",
    "DemoLoad",
    "Row",
    "bundle_rows",
    "demo_fhir_keys",
    "demo_fhir_loads",
    "site_dsn",
    "upsert_rows",
]

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fhir-converter"
# Which sample messages each demo hospital received; several carry the same patient, so later ones
# arrive as updates of rows already there.
DEMO_ASSIGNMENT = {
    "site-a": ["ADT-A01-01", "ADT-A08-01", "ORM-O01-01", "OML-O21-01", "RDE-O11-01", "VXU-V04-01"],
    "site-b": ["LAB-ORU-1", "MDM-T02-01", "ORU-R01-01", "SIU-S12-01"],
}


DEMO_SHARED_SYSTEM = "http://fhir.de/sid/gkv/kvid-10"
# site-b also treats site-a's ADT patient: its own local id, its own spelling of the name.
DEMO_SHARED_PERSON = ("ADT-A01-01", "site-b", "b-20331", "Everywoman-Smith")


def demo_kvnr(patient_id: str) -> str:
    """A deterministic, made-up insurance number (letter + 9 digits) for a demo patient."""
    digits = int(hashlib.sha256(patient_id.encode()).hexdigest(), 16) % 10**9
    return f"D{digits:09d}"


def with_demo_kvnr(resource: dict[str, Any], kvnr: str) -> dict[str, Any]:
    """The Patient with the demo's shared identifier."""
    others = [i for i in resource.get("identifier", []) if i.get("system") != DEMO_SHARED_SYSTEM]
    return {**resource, "identifier": [*others, {"system": DEMO_SHARED_SYSTEM, "value": kvnr}]}


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
            if resource["resourceType"] == "Patient":
                resource = with_demo_kvnr(resource, demo_kvnr(source_id))
            rows.append(Row(resource["resourceType"], source_id, resource))
    return rows


def shared_person_row() -> tuple[str, Row]:
    """(site, row): the second hospital's record of the demo's shared person."""
    bundle, site, local_id, family = DEMO_SHARED_PERSON
    patient = next(r for r in bundle_rows(FIXTURES / f"{bundle}.json", ["Patient"]))
    names = [{**name, "family": family} for name in patient.content.get("name", [])]
    content = {**patient.content, "id": local_id, "name": names}
    return site, Row("Patient", local_id, content)


# site-b's route is `trigger: tumorboard-flag`: its clinicians flagged these cases for the tumour board
# (bundle whose first Encounter is flagged), and the shared person without an encounter.
DEMO_FLAGGED = {"site-b": ["SIU-S12-01", "MDM-T02-01"]}


def tumorboard_flag_row(flag_id: str, patient_id: str, encounter_id: str | None) -> Row:
    """An active tumour-board Flag, as a clinician's tick in the HIS creates it (case study: Flag Case)."""
    content: dict[str, Any] = {
        "resourceType": "Flag",
        "id": flag_id,
        "status": "active",
        "code": {"coding": [{"system": "urn:cdrsync:flag", "code": "tumorboard", "display": "Tumour board"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if encounter_id:
        content["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    return Row("Flag", flag_id, content)


def demo_flags(site: str) -> list[Row]:
    """The demo's tumour-board Flags of a site: first Encounter of each flagged bundle, and the shared person."""
    rows = []
    for bundle in DEMO_FLAGGED.get(site, []):
        bundle_rows_ = bundle_rows(FIXTURES / f"{bundle}.json", ["Encounter"])
        encounter = bundle_rows_[0].content
        patient_id = str(encounter["subject"]["reference"]).removeprefix("Patient/")
        rows.append(tumorboard_flag_row(f"tb-{bundle}", patient_id, encounter["id"]))
    if DEMO_SHARED_PERSON[1] == site and site in DEMO_FLAGGED:
        rows.append(tumorboard_flag_row("tb-shared-person", DEMO_SHARED_PERSON[2], None))
    return rows


@dataclass(frozen=True)
class DemoLoad:
    """One step of `cdrsync demo load`: rows for one site's fhir.resource table, and what they are."""

    site: str
    rows: list[Row]
    what: str  # the bundle's name, or (not a bundle) a sentence on what the rows are
    bundle: bool = True


def demo_fhir_loads(resource_types: Callable[[str], Iterable[str]]) -> list[DemoLoad]:
    """What `demo load` writes into the FHIR hospitals' tables, in order (`resource_types`: what a site carries).

    `demo wait` expects exactly these rows (and the adapter hospitals' demo rows) at the central CDR, so rows
    that other runs left in the same databases (tests, a hospital's own trials) do not count.
    """
    loads = [
        DemoLoad(site, bundle_rows(FIXTURES / f"{bundle}.json", resource_types(site)), bundle)
        for site, bundles in DEMO_ASSIGNMENT.items()
        for bundle in bundles
    ]
    site, row = shared_person_row()
    same = f"the same person as site-a's ADT patient, local id {row.id}: one Patient at central"
    loads.append(DemoLoad(site, [row], same, bundle=False))
    for site in DEMO_ASSIGNMENT:
        if flags := demo_flags(site):
            flagged = f"{len(flags)} tumour-board Flag(s) set: only those cases leave the hospital"
            loads.append(DemoLoad(site, flags, flagged, bundle=False))
    return loads


def demo_fhir_keys(resource_types: Callable[[str], Iterable[str]]) -> dict[str, set[tuple[str, str]]]:
    """site → the (resource type, id) rows the demo writes there."""
    keys: dict[str, set[tuple[str, str]]] = {}
    for load in demo_fhir_loads(resource_types):
        keys.setdefault(load.site, set()).update((row.resource_type, row.id) for row in load.rows)
    return keys


def site_dsn(site: SiteConfig, host: str, port: int, user: str, password: str | None) -> str:
    """libpq connection string for a site's source database."""
    assert site.source is not None
    return pg_dsn(host, port, user, site.source.database, password)


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


SourceRow = tuple[str, str, float, dict[str, Any] | None]


def _selected_rows(site: SiteConfig, rows: list[SourceRow], keys: dict[str, str]) -> list[SourceRow]:
    """The rows a site's triggered routes would send: the worker's own routing and trigger code."""
    states = TriggerTables({}, {}, {})
    chosen: set[tuple[str, str]] = set()
    for resource_type, source_id, committed, content in rows:
        if content is None or (resource_type == "Patient" and source_id not in keys):
            continue  # a Patient without the shared identifier is held by identity, not routed
        record = NormalizedResource(
            source_commit_ms=int(committed * 1000),
            captured_ms=0,
            origin_topic="",
            origin_partition=0,
            origin_offset=0,
            site=site.site,
            resource_type=resource_type,
            source_id=source_id,
            resource=orjson.dumps({**content, "id": source_id}).decode(),
            content_hash=canonical_hash(content),
            patient_ref=patient_reference({**content, "id": source_id}),
        )
        for routed in route_resource(record, site, keys.get):
            for item in select_records(states, routed, _route_trigger(site, routed.target)).send:
                chosen.add((item.resource_type, item.source_id))
    return [row for row in rows if (row[0], row[1]) in chosen]


def _route_trigger(site: SiteConfig, target: str) -> str:
    return next((route.trigger for route in site.routes if route.target == target), TRIGGER_ALL)


def source_rows(dsn: str, *, table: str = "fhir.resource", only: set[tuple[str, str]] | None = None) -> list[SourceRow]:
    """(resource_type, id, updated_at epoch seconds, content) of the rows of a site table (`only`: these keys)."""
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            f"SELECT resource_type, id, extract(epoch from updated_at), content FROM {table} ORDER BY updated_at"
        )
        rows = [(t, i, float(ts), content) for t, i, ts, content in cur.fetchall()]
    return rows if only is None else [row for row in rows if (row[0], row[1]) in only]


def _patient_key(site: SiteConfig, content: dict[str, Any] | None) -> str | None:
    return site.identity.patient_key(content or {}) if site.identity else None


def expected_targets(site: SiteConfig, rows: Iterable[SourceRow]) -> tuple[dict[str, float], int]:
    """Target reference → source commit time for a site's rows, and how many wait for a shared identifier.

    A Patient's central id derives from its shared identifier (one Patient for one person at all sites).
    """
    expected: dict[str, float] = {}
    waiting = 0
    rows = list(rows)
    if any(route.trigger != TRIGGER_ALL for route in site.routes):
        keys = {i: k for t, i, _, c in rows if t == "Patient" and (k := _patient_key(site, c))}
        rows = [row for row in _selected_rows(site, rows, keys) if row[0] != "Patient" or row[1] in keys]
    for resource_type, source_id, committed, content in rows:
        if resource_type != "Patient":
            ref = f"{resource_type}/{target_id(site.site, resource_type, source_id)}"
        elif key := _patient_key(site, content):
            ref = f"Patient/{key}"
        else:
            waiting += 1
            continue
        expected[ref] = max(committed, expected.get(ref, 0.0))
    return expected, waiting


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
