"""Synthea's per-patient transaction bundles → rows of the bench site's fhir.resource table.

Pure functions, except `load_rows`. Each phase loads the same resources under its own id namespace
(`<namespace>-<synthea id>`), so no phase updates another's resources at the target and a rerun creates
new ones; the content is Synthea's, unchanged except for references, ids and the shared identifier.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg

from pipeline.errors import MappingError
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.references import map_references
from pipeline.resources import validate_resource
from tests.casebuilder import KVNR_SYSTEM, kvnr_of, with_kvnr

__all__ = ["Dataset", "Flattened", "expected_ref", "flatten_bundle", "flatten_bundles", "load_rows"]

Resource = dict[str, Any]
_MAX_ID = 64  # FHIR id: [A-Za-z0-9\-\.]{1,64}


@dataclass
class Flattened:
    """Resources to load, in bundle order, and what was left out by type and reason."""

    resources: list[Resource] = field(default_factory=list)
    not_carried: Counter[str] = field(default_factory=Counter)  # types the bench site does not declare
    invalid: Counter[str] = field(default_factory=Counter)  # failed the normalize stage's R4 validation
    invalid_ids: set[tuple[str, str]] = field(default_factory=set)  # (type, Synthea id) of those

    def loaded(self) -> Counter[str]:
        return Counter(r["resourceType"] for r in self.resources)

    def extend(self, other: Flattened) -> None:
        self.resources += other.resources
        self.not_carried.update(other.not_carried)
        self.invalid.update(other.invalid)
        self.invalid_ids |= other.invalid_ids


def _new_id(namespace: str, source_id: str) -> str:
    new = f"{namespace}-{source_id}"
    if len(new) > _MAX_ID:
        raise ValueError(f"id {new!r} is longer than FHIR's {_MAX_ID} characters: use a shorter namespace")
    return new


def flatten_bundle(
    bundle: Resource,
    namespace: str,
    carried: frozenset[str],
    *,
    validate: bool = True,
    skip: frozenset[tuple[str, str]] = frozenset(),
) -> Flattened:
    """One Synthea bundle → site rows: `urn:uuid:` references become `Type/<namespace>-<id>`, every Patient gets
    the shared identifier (KVNR, derived from its new id as tests/casebuilder.py does), types the site does not
    carry and resources the normalize stage would reject are counted, not loaded. Resources named in `skip`
    (type, Synthea id) are left out as invalid without validating again (`validate=False`: a data set
    already validated under another namespace)."""
    entries = [e for e in bundle.get("entry") or [] if isinstance(e.get("resource"), dict)]
    by_url = {}
    for entry in entries:
        resource = entry["resource"]
        new = f"{resource['resourceType']}/{_new_id(namespace, resource['id'])}"
        by_url[str(entry.get("fullUrl", ""))] = new
        by_url[f"{resource['resourceType']}/{resource['id']}"] = new

    def rewrite(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
        return {**node, "reference": by_url[reference]} if reference in by_url else None

    out = Flattened()
    for entry in entries:
        resource = entry["resource"]
        kind = resource["resourceType"]
        if kind not in carried:
            out.not_carried[kind] += 1
            continue
        if (kind, resource["id"]) in skip:
            out.invalid[kind] += 1
            continue
        row = map_references(resource, rewrite)
        row["id"] = _new_id(namespace, resource["id"])
        if kind == "Patient":
            row = with_kvnr(row, kvnr_of(row["id"]))
        if validate:
            try:
                validate_resource(row)
            except MappingError:
                out.invalid[kind] += 1
                out.invalid_ids.add((kind, resource["id"]))
                continue
        out.resources.append(row)
    return out


def flatten_bundles(bundles: Iterable[Resource], namespace: str, carried: frozenset[str]) -> Flattened:
    """Every bundle, in order (each one Patient first), validated."""
    out = Flattened()
    for bundle in bundles:
        out.extend(flatten_bundle(bundle, namespace, carried))
    return out


@dataclass
class Dataset:
    """A population's bundles, validated once; `resources(namespace)` gives its rows under a namespace."""

    bundles: list[Resource]
    carried: frozenset[str]
    summary: Flattened = field(init=False)

    def __post_init__(self) -> None:
        self.summary = flatten_bundles(self.bundles, "x", self.carried)

    def resources(self, namespace: str) -> list[Resource]:
        skip = frozenset(self.summary.invalid_ids)
        out = Flattened()
        for bundle in self.bundles:
            out.extend(flatten_bundle(bundle, namespace, self.carried, validate=False, skip=skip))
        return out.resources


def expected_ref(resource: Resource, site: str) -> str:
    """Where the pipeline writes a loaded resource at the target: a Patient at its shared identifier's key."""
    kind = resource["resourceType"]
    if kind == "Patient":
        return f"Patient/{global_patient_key(KVNR_SYSTEM, kvnr_of(resource['id']))}"
    return f"{kind}/{target_id(site, kind, resource['id'])}"


def load_rows(dsn: str, resources: list[Resource], *, per_transaction: int = 500) -> None:
    """Insert (or update) rows the way a hospital CDR writes them, a few hundred per transaction."""
    statement = (
        "INSERT INTO fhir.resource (resource_type, id, version, content) VALUES (%s, %s, 1, %s) "
        "ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
        "version = fhir.resource.version + 1, updated_at = now()"
    )
    with psycopg.connect(dsn) as conn:
        for start in range(0, len(resources), per_transaction):
            chunk = resources[start : start + per_transaction]
            with conn.cursor() as cur:
                cur.executemany(statement, [(r["resourceType"], r["id"], orjson.dumps(r).decode()) for r in chunk])
            conn.commit()
