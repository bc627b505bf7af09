"""Provenance (DESIGN.md decision 9): every central resource points back at its source site and source id.

Cost: one Provenance per (site, central resource), written once, not once per version: it is emitted when
the order stage releases a resource for the first time (not in `released_by_reference` before), or when a
site first contributes to a central Patient (not in `patient_sources_by_patient_key` before). Its id is
deterministic (uuid5 over site, "Provenance" and the target reference), so a replay rewrites the same one,
and its content is stable (the first source commit is `recorded`; the source id never changes).

Deletes: the target refuses to delete a resource a Provenance still references, so a delete carries its
Provenance(s) in `delete_with` and the sink deletes them in one transaction (deleting an absent one is a
no-op there). A Patient's delete carries the Provenance of every hospital, since any may have contributed.

Writing them (runs_alongside): the order stage emits a resource's Provenance right after what it released, on
the patient's partition, and the sink writes one patient's records one after the other. Nothing refers to a
Provenance and each refers only to its own resource, written before it, so the sink writes Provenances
alongside the patient's next records (up to sink_in_flight at once) instead of in their chain: they do not
double the length of a patient's chain of writes (a back-load, or one patient's record sent to the tumour
board, against a target whose every request costs a round trip). A delete waits for them, since it takes
its resource's Provenances with it, and so does the end of the sink's batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson

from .ids import ORIGIN_TAG_SYSTEM, target_id
from .records import RoutedResource, canonical_hash
from .references import logical_system

__all__ = ["SITE_SYSTEM", "add_provenance", "provenance_for", "provenance_id", "runs_alongside"]

SITE_SYSTEM = "urn:cdrsync:site"
_ACTIVITY = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_AGENT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def provenance_id(site: str, target_ref: str) -> str:
    """The deterministic id of a site's Provenance for one central resource."""
    return target_id(site, "Provenance", target_ref)


def provenance_for(record: RoutedResource, site_display: str = "") -> RoutedResource:
    """The Provenance of a released resource: target = it at central, entity = its source id at its site."""
    recorded = datetime.fromtimestamp(record.source_commit_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    body: dict[str, Any] = {
        "resourceType": "Provenance",
        "id": provenance_id(record.site, record.target_ref),
        "meta": {
            "tag": [{"system": ORIGIN_TAG_SYSTEM, "code": record.site}],
            "source": f"urn:cdrsync:site:{record.site}",
        },
        "target": [{"reference": record.target_ref}],
        "recorded": recorded,
        "activity": {"coding": [{"system": _ACTIVITY, "code": "CREATE", "display": "create"}]},
        "agent": [
            {
                "type": {"coding": [{"system": _AGENT_TYPE, "code": "custodian", "display": "Custodian"}]},
                "who": {
                    "identifier": {"system": SITE_SYSTEM, "value": record.site},
                    "display": site_display or record.site,
                },
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "type": record.resource_type,
                    "identifier": {
                        "system": logical_system(record.site, record.resource_type),
                        "value": record.source_id,
                    },
                },
            }
        ],
    }
    return replace(
        record,
        resource_type="Provenance",
        source_id=f"{record.resource_type}/{record.source_id}",
        target_id=body["id"],
        op="CREATE",
        resource=orjson.dumps(body).decode(),
        content_hash=canonical_hash(body),
        dependencies=[record.target_ref],
        delete_with=[],
    )


def _first_contribution(
    record: RoutedResource, released: Mapping[str, Any], patients: Mapping[str, dict[str, Any]]
) -> bool:
    if record.resource_type == "Patient":
        return record.site not in (patients.get(record.target_id) or {}).get("sites", [])
    return record.target_ref not in released


def add_provenance(
    releasable: list[RoutedResource],
    released: Mapping[str, Any],
    patients: Mapping[str, dict[str, Any]],
    sites: Iterable[str],
    displays: Mapping[str, str] | None = None,
) -> list[RoutedResource]:
    """The records to write: deletes carry their Provenance, first releases are followed by a new one.

    `released` and `patients` are the order stage's tables as they were before this batch.
    """
    out: list[RoutedResource] = []
    provenances: list[RoutedResource] = []
    seen: set[str] = set()
    for record in releasable:
        if record.is_delete and record.resource_type == "Provenance":  # a site leaving a Patient: its Provenance
            out.append(record)
            continue
        if record.is_delete:
            owners = list(sites) if record.resource_type == "Patient" else [record.site]
            extra = [
                f"Provenance/{provenance_id(site, ref)}"
                for ref in [record.target_ref, *record.delete_with]
                for site in owners
            ]
            out.append(replace(record, delete_with=[*record.delete_with, *extra]))
            continue
        out.append(record)
        key = f"{record.site}|{record.target_ref}"
        if record.op == "MOVE":  # not a resource: a move of the site's resources (pipeline/patientmove.py)
            continue
        if key not in seen and _first_contribution(record, released, patients):
            seen.add(key)
            provenances.append(provenance_for(record, (displays or {}).get(record.site, "")))
    return out + provenances


def runs_alongside(record: RoutedResource) -> bool:
    """Whether the sink may write this record alongside a patient's other writes instead of in their order:
    a Provenance upsert (see "Writing them" above)."""
    return record.resource_type == "Provenance" and not record.is_delete
