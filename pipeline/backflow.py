"""Back-flow: a tumour-board decision written at the central CDR goes to every hospital that treats the patient.

Central is a site (sites/central.yaml, `capture`): its own changes arrive like any site's (pipeline/capture.py →
normalize). Its ids are already global: a central QuestionnaireResponse's subject is `Patient/<global key>`.
The order stage (partitioned by global key, like `patient_sources_by_patient_key`, which records which hospitals
sent the patient and each hospital's version of it) turns one central change into one record per contributing
hospital that declares `writeback`, with:
  * the patient reference rewritten to that hospital's own local id (the central Patient keeps each
    hospital's local id as identifier urn:cdrsync:<site>:Patient);
  * every other literal reference made logical (identifier urn:cdrsync:central:<type>), since the hospital has
    no copy of central's other resources;
  * a deterministic id at the hospital (uuid5 over central, type and central id), so a replay rewrites;
  * the central id kept as identifier, and meta.tag urn:cdrsync:origin-site = central;
  * the central version it was made from as meta.tag urn:cdrsync:source-version, so that a version written
    late (a replayed dead letter, a record read again) never replaces a newer one at the hospital.
Loop prevention: that tag makes the hospital's own capture of the written row stop at identity resolution
(`echo_targets`: never routed back to the site that wrote it), and central's capture skips versions that
cdrsync wrote there for a hospital (`capture.is_own_change`).

A hospital's version a reviewer takes over central's (`cdrsync conflicts resolve --take-incoming`) is central's
decision: written with central's own source (`decided_at_central`), it flows back like a board edit, so the
hospitals holding the board's version it replaces, or still waiting for it, get what central holds now.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from .config import Config, SiteConfig
from .errors import RejectedByTargetError, VersionConflictError
from .fhirclient import FhirClient
from .ids import CDRSYNC_SOURCE_PREFIX, ORIGIN_TAG_SYSTEM, SERVER_META, target_id
from .records import NormalizedResource, RoutedResource, canonical_hash
from .references import logical_system, rewrite_references

__all__ = [
    "SOURCE_VERSION_TAG_SYSTEM",
    "WriteBack",
    "captured_at_target",
    "central_record",
    "central_supersedes",
    "decided_at_central",
    "echo_targets",
    "flows_back",
    "hospital_form",
    "local_patient_id",
    "suppressed_routes",
    "write_back_records",
    "write_fhir_copy",
    "written_version",
]

SOURCE_VERSION_TAG_SYSTEM = "urn:cdrsync:source-version"
log = logging.getLogger("cdrsync.backflow")
_RACES = 3  # reads and conditional writes in a row that found the resource changed in between, at most


def flows_back(config: Config, site: str) -> bool:
    """True for a site whose own changes flow back to the hospitals (it declares `capture`)."""
    declared = config.sites.get(site)
    return declared is not None and declared.capture is not None


def captured_at_target(config: Config, record: RoutedResource) -> bool:
    """Whether the record's target captures its own changes of the record's type: they flow back."""
    target = config.sites.get(record.target)
    return target is not None and target.capture is not None and record.resource_type in target.resource_types


def decided_at_central(config: Config, record: RoutedResource) -> RoutedResource:
    """A version of a resource a reviewer decided on (`cdrsync conflicts resolve`), as the sink writes it: where
    central captures its own changes of this type, with central's own meta.source, so the capture takes it for
    central's change and it flows back to every hospital of the patient. Otherwise it would stay a hospital's write,
    never captured: the hospitals holding the board's version it replaced would keep a decision central no longer
    holds, and a hospital whose copy of that version was still on its way would get nothing (central_supersedes
    stops it). Any other record is returned as it is."""
    if not captured_at_target(config, record) or record.resource is None:
        return record
    resource = orjson.loads(record.resource)
    meta = {**(resource.get("meta") or {}), "source": f"{CDRSYNC_SOURCE_PREFIX}{record.target}"}
    return replace(record, resource=orjson.dumps({**resource, "meta": meta}).decode())


def echo_targets(resource_json: str | None) -> frozenset[str]:
    """Sites a resource was written from by cdrsync (its origin tags): it must never be routed back to them."""
    if not resource_json:
        return frozenset()
    tags = (orjson.loads(resource_json).get("meta") or {}).get("tag") or []
    return frozenset(str(t.get("code")) for t in tags if isinstance(t, dict) and t.get("system") == ORIGIN_TAG_SYSTEM)


def suppressed_routes(record: NormalizedResource, site: SiteConfig) -> list[str]:
    """Targets of the site's routes that a record is not sent to because cdrsync wrote it there from them."""
    echoes = echo_targets(record.resource)
    carried = [r.target for r in site.routes if record.resource_type in (r.resource_types or site.resource_types)]
    return [target for target in carried if target in echoes]


def central_record(record: NormalizedResource) -> RoutedResource:
    """A central change, keyed by its patient's global key (central ids are global); target set per hospital."""
    patient_key = (record.patient_ref or "").removeprefix("Patient/") or record.source_id
    return RoutedResource.of(record, target="", target_id=record.source_id, patient_key=patient_key)


def local_patient_id(patient_version: str, site: str) -> str | None:
    """A hospital's local Patient id, from its version of the central Patient (urn:cdrsync:<site>:Patient)."""
    body = orjson.loads(patient_version)
    for identifier in body.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == logical_system(site, "Patient"):
            return str(identifier.get("value"))
    return None


def hospital_form(
    resource: dict[str, Any], central: str, patient_key: str, local_patient: str, version: int | None = None
) -> dict[str, Any]:
    """The central resource as a hospital stores it: its patient reference local, the rest logical, tagged
    with where it came from and (when known) the central version it was made from."""

    def to_local(resource_type: str, resource_id: str) -> str | None:
        return local_patient if resource_type == "Patient" and resource_id == patient_key else None

    body = rewrite_references(resource, central, frozenset({"Patient"}), to_local).resource
    central_id = {"system": logical_system(central, resource["resourceType"]), "value": resource["id"]}
    if resource["resourceType"] == "QuestionnaireResponse":  # identifier 0..1: the central id, when free
        body["identifier"] = body.get("identifier") or central_id
    else:
        body["identifier"] = [*(body.get("identifier") or []), central_id]
    meta = {k: v for k, v in (body.get("meta") or {}).items() if k not in SERVER_META}
    ours = (ORIGIN_TAG_SYSTEM, SOURCE_VERSION_TAG_SYSTEM)
    tags = [t for t in meta.get("tag", []) if t.get("system") not in ours]
    meta["tag"] = [*tags, {"system": ORIGIN_TAG_SYSTEM, "code": central}]
    if version is not None:
        meta["tag"].append({"system": SOURCE_VERSION_TAG_SYSTEM, "code": str(version)})
    meta["source"] = f"{CDRSYNC_SOURCE_PREFIX}{central}"
    body["meta"] = meta
    body["id"] = target_id(central, resource["resourceType"], resource["id"])
    return body


@dataclass(frozen=True)
class WriteBack:
    """Records for the hospitals, and hospitals that could not be served (no local id known)."""

    records: list[RoutedResource]
    missing: list[str]


def write_back_records(config: Config, patients: Mapping[str, dict[str, Any]], record: RoutedResource) -> WriteBack:
    """One record per hospital that sent the patient and accepts back-flow, in the hospital's own ids."""
    entry = patients.get(record.patient_key) or {"sites": [], "versions": {}}
    out: list[RoutedResource] = []
    missing: list[str] = []
    for site in entry["sites"]:
        declared = config.sites.get(site)
        if declared is None or declared.writeback is None or record.resource_type not in declared.resource_types:
            continue
        local = local_patient_id(entry["versions"][site], site)
        if local is None:
            missing.append(site)
            continue
        body = None
        if record.resource is not None:
            resource = orjson.loads(record.resource)
            body = hospital_form(resource, record.site, record.patient_key, local, record.source_version)
        out.append(
            replace(
                record,
                target=site,
                target_id=target_id(record.site, record.resource_type, record.source_id),
                resource=orjson.dumps(body).decode() if body is not None else None,
                content_hash=canonical_hash(body) if body is not None else None,
                dependencies=[f"Patient/{local}"],
            )
        )
    return WriteBack(out, missing)


def written_version(resource: dict[str, Any] | None) -> int | None:
    """The central version a written-back resource was made from (its urn:cdrsync:source-version tag), if any.

    The highest such tag: a FHIR server may keep the tags of earlier versions on the resource (HAPI does, by
    default), and a copy is never written over a newer one, so the highest is that of the current content.
    """
    versions = [
        int(code)
        for tag in ((resource or {}).get("meta") or {}).get("tag") or []
        if isinstance(tag, dict) and tag.get("system") == SOURCE_VERSION_TAG_SYSTEM
        for code in [str(tag.get("code") or "")]
        if code.isdigit()
    ]
    return max(versions, default=None)


async def write_fhir_copy(client: FhirClient, record: RoutedResource) -> str:
    """Write a hospital's copy to its FHIR server (writeback.method fhir), never over a copy made from a newer
    central version: as the table write-back, a late or replayed record leaves a newer decision in place.

    The copy there is read first. Written from a newer version (its source-version tag): nothing is written.
    Otherwise the write names the version read (If-Match; a create names "none there", as the sink's first
    write), so a copy written by someone else in between is not overwritten: it is read again and decided
    anew. A deletion first tags the copy with its own version (_tag_deletion), so that a deleted copy still
    refuses older versions. Returns what happened, for the audit: upserted, deleted, absent or superseded
    (version N there).
    """
    rtype, rid = record.resource_type, record.target_id
    create_refused = False
    for _ in range(_RACES):
        current = await client.read(rtype, rid)
        # A deleted copy: its last version, which carries the deletion's version (tagged just before it).
        last = current if current is not None else await client.last_stored(rtype, rid)
        there = written_version(last)
        if there is not None and record.source_version is not None and there > record.source_version:
            return f"superseded (version {there} there)"
        if not record.is_delete and current is None and last is not None and there == record.source_version:
            # Deleted there after holding this version: a deletion carries the version it deleted (its `before`),
            # so this is that version read again (a restart, a replay), which must not bring it back.
            return f"superseded (deleted at version {there} there)"
        if record.is_delete:
            if current is None:
                return "absent"
            if record.source_version is not None:
                await _tag_deletion(client, record)
            await client.delete(rtype, rid)
            return "deleted"
        assert record.resource is not None
        body = record.resource.encode()
        try:
            if current is not None:  # over the version read (a server that numbers none: unconditionally)
                version = (current.get("meta") or {}).get("versionId")
                written = await client.put(rtype, rid, body, if_match=str(version) if version else None)
            elif last is not None or create_refused:
                # A deleted copy (a create-only write refuses it): written over. Or a create refused while
                # nothing was there, and still nothing: a plain write, whose own answer says why (a 400, a 403).
                written = await client.put(rtype, rid, body)
            else:
                created = await client.create_if_absent(rtype, rid, body)
                if created is None and client.create_only_version is not None:
                    create_refused = True
                    continue  # created meanwhile, or refused: decide again against what is there now
                written = created or await client.put(rtype, rid, body)  # a target that cannot create only-if-absent
            return f"upserted (FHIR version {written.version_id})"
        except VersionConflictError:
            continue  # changed since it was read: read again
    raise VersionConflictError(f"{rtype}/{rid} changed at {record.target} between read and write {_RACES} times")


async def central_supersedes(central: FhirClient, record: RoutedResource) -> str | None:
    """Why a central version must not be written back any more (the audit detail), or None while it is still
    central's current version.

    A record can reach the write-back after central moved on: read again after a restart, or a dead letter
    replayed hours later, in any order. A newer version there has its own record, written back in its turn;
    a decision deleted at central (or no longer there at all) must not reappear at a hospital, even where the
    hospital's copy is absent and so carries no trace of the deletion (a FHIR endpoint, whose deleted copies
    keep their last version but whose never-written ones keep nothing). A deletion always goes on.
    """
    if record.is_delete or record.source_version is None:
        return None
    current, gone = await central.read_or_gone(record.resource_type, record.source_id)
    if current is None:
        return "superseded (deleted at central)" if gone else "superseded (no longer at central)"
    version = str((current.get("meta") or {}).get("versionId") or "")
    if version.isdigit() and int(version) > record.source_version:
        return f"superseded (version {version} at central)"
    return None


async def _tag_deletion(client: FhirClient, record: RoutedResource) -> None:
    """Tag the copy with the deletion's central version before deleting it ($meta-add: no new version). A
    FHIR server keeps a deleted resource's history, and with it this tag, so an older version's upsert
    arriving later is refused (write_fhir_copy reads it there). A server without $meta-add: deleted untagged."""
    tag = {"system": SOURCE_VERSION_TAG_SYSTEM, "code": str(record.source_version)}
    try:
        await client.meta_add(record.resource_type, record.target_id, [tag])
    except RejectedByTargetError as error:
        log.warning(
            "%s at %s: $meta-add refused (%s); deleted without its version, a late older upsert would recreate it",
            record.target_ref,
            record.target,
            error.status,
        )
