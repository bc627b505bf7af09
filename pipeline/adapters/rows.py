"""Captured rows of the `openehr` and `hl7v2` adapters → the FHIR resources to upsert and to delete.

One captured change yields many resources. Their ids derive from the source (composition uid + entry
path; HL7 identifiers), so a new version of a composition, a re-sent message or a replay rewrites the
same resources. What a composition version no longer contains is deleted: the previous version's
resources are computed from Debezium's before-image (the table has REPLICA IDENTITY FULL).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from ..config import SiteConfig
from ..envelope import UNAVAILABLE_VALUE, ChangeEvent, resolve_toast
from ..errors import EnvelopeError, MappingError
from .hl7v2 import Hl7Context, message_to_resources
from .openehr import CompositionSource, Mapped, composition_to_resources

__all__ = ["RowResult", "hl7v2_change", "openehr_change"]


@dataclass
class RowResult:
    """Resources to write, resources to delete (their last content), and what could not be mapped."""

    upserts: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _json(value: Any, what: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise MappingError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MappingError(f"{what} is not a JSON object")
    return value


def _source(row: dict[str, Any]) -> CompositionSource:
    try:
        return CompositionSource(
            uid=str(row["uid"]),
            system_id=str(row["system_id"]),
            version=int(row["version"]),
            ehr_id=str(row["ehr_id"]),
            subject_id=str(row["subject_id"]),
            subject_namespace=str(row["subject_namespace"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"row lacks the columns of an openehr composition table: {exc!r}") from None


def openehr_change(site: SiteConfig, event: ChangeEvent) -> RowResult:
    """A change of openehr.composition → its resources; entries gone from the new version are deleted."""
    result = RowResult()
    current = None
    if event.op != "d":
        source = _source(event.row)
        content = _json(resolve_toast(event, "content"), f"composition {source.uid} content")
        current = composition_to_resources(content, source, site.zone, site.identifier_systems, isolate=True)
        result.upserts = [current.patient, *current.resources]
        result.problems += [
            f"composition {source.version_uid}: no mapping rule for archetype {u.archetype_id} at {u.path}"
            for u in current.unmapped
        ]
        result.problems += [f"composition {source.version_uid}: {f.reason}" for f in current.failed]
    if event.op in ("u", "d"):
        previous = _previous(site, event, result)
        if previous is not None:
            keep = {(r["resourceType"], r["id"]) for r in result.upserts}
            # An entry still there but not mapped this time (a dead letter) is not deleted for that.
            for failed in current.failed if current is not None else []:
                keep.update(previous.entries.get(failed.path, []))
            result.deletes = [r for r in previous.resources if (r["resourceType"], r["id"]) not in keep]
    return result


def _previous(site: SiteConfig, event: ChangeEvent, result: RowResult) -> Mapped | None:
    """The resources the previous version mapped to (not its Patient: the EHR outlives a composition)."""
    before = event.before or {}
    content = before.get("content")
    if content is None or content == UNAVAILABLE_VALUE:
        message = "no before-image of the composition (REPLICA IDENTITY FULL missing)"
        if event.op == "d":
            raise EnvelopeError(f"delete: {message}; its resources cannot be found")
        result.problems.append(f"{message}: entries this version removed are not deleted")
        return None
    try:
        mapped = composition_to_resources(
            _json(content, "previous composition"), _source(before), site.zone, site.identifier_systems, isolate=True
        )
    except MappingError as error:
        if event.op == "d":
            raise
        result.problems.append(f"previous version not mappable ({error}): entries it removed are not deleted")
        return None
    return mapped


def hl7v2_change(site: SiteConfig, event: ChangeEvent) -> RowResult:
    """A row of the hl7v2 inbox → the resources its message carries.

    Deleting an inbox row is housekeeping of a message already applied, not a clinical deletion: it
    maps to nothing. An update (a message re-queued) maps again to the same ids.
    """
    if event.op == "d":
        return RowResult()
    message = resolve_toast(event, "message")
    if not isinstance(message, str) or not message.strip():
        raise EnvelopeError("row lacks the 'message' column of an hl7v2 inbox table")
    mapped = message_to_resources(message, Hl7Context(site.site, site.zone, site.identifier_systems))
    return RowResult(upserts=mapped.resources, problems=[f"{mapped.message_type}: {p}" for p in mapped.problems])
