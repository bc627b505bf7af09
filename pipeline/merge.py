"""The central Patient, assembled from every site's version of one person (DESIGN.md decision 4).

The site that sent the patient first owns the demographics: the central Patient is its version.
The other sites' identifiers (their local ids, MRNs) are added to it, and each contributing site
tags it, so nothing a later hospital sends overwrites name, birth date, gender or address.
State, partitioned by global patient key like the order stage:
  patient_sources_by_patient_key   key → {"sites": [in first-arrival order], "versions": {site: JSON},
                                          "moved": {site: key}, "awaiting": {site: {move: ms}},
                                          "over": {site: [move]} (pipeline/patientmove.py; when any)}
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import replace
from typing import Any

import orjson

from .ids import ORIGIN_TAG_SYSTEM
from .records import RoutedResource, canonical_hash

__all__ = ["merge_patient", "merged_patient"]


def _identifier_key(identifier: Any) -> tuple[str, str]:
    return (
        (str(identifier.get("system", "")), str(identifier.get("value", "")))
        if isinstance(identifier, dict)
        else ("", "")
    )


def merged_patient(sites: list[str], versions: dict[str, str]) -> dict[str, Any]:
    """The owner's Patient with every other site's identifiers and origin tags added."""
    owner, *others = sites
    body: dict[str, Any] = orjson.loads(versions[owner])
    identifiers = list(body.get("identifier") or [])
    seen = {_identifier_key(i) for i in identifiers}
    meta = dict(body.get("meta") or {})
    tags = list(meta.get("tag") or [])
    for site in others:
        other = orjson.loads(versions[site])
        for identifier in other.get("identifier") or []:
            if _identifier_key(identifier) not in seen:
                seen.add(_identifier_key(identifier))
                identifiers.append(identifier)
        tags.append({"system": ORIGIN_TAG_SYSTEM, "code": site})
    meta["tag"] = tags
    return {**body, "identifier": identifiers, "meta": meta}


def merge_patient(patients: MutableMapping[str, dict[str, Any]], record: RoutedResource) -> RoutedResource:
    """A site's Patient change → the central Patient's new state (other records pass unchanged)."""
    if record.resource_type != "Patient":
        return record
    entry = patients.get(record.target_id) or {"sites": [], "versions": {}}
    sites, versions = list(entry["sites"]), dict(entry["versions"])
    # Sites whose records moved to another Patient after an identity review (pipeline/patientmove.py): until the
    # site sends a Patient here again, its records still on their way here follow them.
    moved = {site: key for site, key in (entry.get("moved") or {}).items() if site != record.site or record.is_delete}
    # A site's records waiting here for a hand-over, and hand-overs that came before their notice: kept as they are.
    kept = {k: entry[k] for k in ("awaiting", "over") if entry.get(k)} | ({"moved": moved} if moved else {})
    if record.is_delete:
        versions.pop(record.site, None)
        sites = [site for site in sites if site != record.site]
        if not sites:  # no hospital holds this person any more
            if kept:
                patients[record.target_id] = {"sites": [], "versions": {}, **kept}
            else:
                patients.pop(record.target_id, None)
            return record
    else:
        assert record.resource is not None
        versions[record.site] = record.resource
        if record.site not in sites:
            sites.append(record.site)
    patients[record.target_id] = {"sites": sites, "versions": versions, **kept}
    body = merged_patient(sites, versions)
    op = "UPDATE" if record.is_delete else record.op  # a site leaving updates the central Patient
    return replace(record, op=op, resource=orjson.dumps(body).decode(), content_hash=canonical_hash(body))
