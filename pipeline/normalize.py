"""Stage 1: a Debezium change of a site table → validated FHIR R4 resources (NormalizedResource).

The `fhir` adapter yields one resource per change (`normalize_change`); the `openehr` and `hl7v2`
adapters yield many, plus the parts they could not map (`normalize_changes` returns them all).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import orjson

from .adapters.fhir import row_identity, row_to_resource
from .adapters.rows import RowResult, hl7v2_change, openehr_change
from .config import SiteConfig
from .envelope import ChangeEvent, decode_temporal, parse_envelope
from .errors import EnvelopeError, MappingError, OversizeError
from .records import NormalizedResource, canonical_hash
from .resources import is_fhir_type, patient_reference, validate_resource

__all__ = ["Filtered", "NormalizedBatch", "SourcePosition", "normalize_change", "normalize_changes"]

_OPS = {"c": "CREATE", "u": "UPDATE", "d": "DELETE", "r": "SNAPSHOT"}


@dataclass(frozen=True)
class SourcePosition:
    """Where a Kafka record sits: enough to find it again."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class Filtered:
    """A change deliberately not carried (its type is not declared for the site)."""

    site: str
    resource_type: str


@dataclass
class NormalizedBatch:
    """What one change became: records to publish, types filtered out, and parts that could not be mapped
    (each a reason naming the source element, for the dead-letter record; never silently dropped)."""

    records: list[NormalizedResource] = field(default_factory=list)
    filtered: list[Filtered] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _parse(site: SiteConfig, value: bytes | None) -> ChangeEvent | None:
    event = parse_envelope(value)
    if (
        event is not None
        and site.source is not None
        and (event.schema, event.table)
        != (
            site.source.schema_name,
            site.source.table,
        )
    ):
        raise EnvelopeError(f"change of {event.schema}.{event.table}, not the site's source table")
    return event


def _check_size(value: bytes | None, max_bytes: int | None) -> None:
    if value is not None and max_bytes is not None and len(value) > max_bytes:
        raise OversizeError(f"change record of {len(value)} bytes exceeds the limit of {max_bytes} bytes")


def normalize_changes(
    site: SiteConfig, value: bytes | None, position: SourcePosition, max_bytes: int | None = None
) -> NormalizedBatch | None:
    """Decode, map and validate one change of any adapter; None for a tombstone.

    Raises PermanentError when nothing of the change can be carried (too large, not a change event, a
    message type or row the adapter rejects); a part that cannot be mapped is a problem in the batch instead.
    """
    _check_size(value, max_bytes)
    event = _parse(site, value)
    if event is None:
        return None
    if site.adapter == "fhir":
        single = _fhir_change(site, event, position)
        if isinstance(single, Filtered):
            return NormalizedBatch(filtered=[single])
        withdrawn = _withdrawn(site, event, single)
        return NormalizedBatch([withdrawn, single] if withdrawn is not None else [single])
    rows = openehr_change(site, event) if site.adapter == "openehr" else hl7v2_change(site, event)
    return _batch(site, event, position, rows)


def _batch(site: SiteConfig, event: ChangeEvent, position: SourcePosition, rows: RowResult) -> NormalizedBatch:
    batch = NormalizedBatch(problems=list(rows.problems))
    version = _int_or_none(event.row.get("version", event.row.get("id")))
    changes = [(r, _OPS[event.op] if event.op != "d" else "DELETE") for r in rows.upserts]
    changes += [(r, "DELETE") for r in rows.deletes]
    for resource, op in changes:
        if resource["resourceType"] not in site.resource_types:
            batch.filtered.append(Filtered(site.site, resource["resourceType"]))
            continue
        content = resource if op != "DELETE" else None
        if content is not None:
            try:
                validate_resource(content)
            except MappingError as error:
                batch.problems.append(f"{resource['resourceType']}/{resource['id']}: {error}")
                continue
        batch.records.append(_record(site, event, position, resource, op, content, version))
    return batch


def _record(
    site: SiteConfig,
    event: ChangeEvent,
    position: SourcePosition,
    resource: dict[str, object],
    op: str,
    content: dict[str, object] | None,
    version: int | None,
) -> NormalizedResource:
    return NormalizedResource(
        site=site.site,
        resource_type=str(resource["resourceType"]),
        source_id=str(resource["id"]),
        op=op,
        resource=orjson.dumps(content).decode() if content is not None else None,
        content_hash=canonical_hash(content) if content is not None else None,
        patient_ref=patient_reference(resource),  # a delete keeps the patient of its last content
        source_version=version,
        source_lsn=event.lsn,
        source_commit_ms=_commit_ms(event),
        captured_ms=event.captured_ts_ms,
        origin_topic=position.topic,
        origin_partition=position.partition,
        origin_offset=position.offset,
    )


def normalize_change(
    site: SiteConfig, value: bytes | None, position: SourcePosition, max_bytes: int | None = None
) -> NormalizedResource | Filtered | None:
    """Decode, map and validate one change of a `fhir` table; None for a tombstone. PermanentError on bad input."""
    _check_size(value, max_bytes)
    event = _parse(site, value)
    return None if event is None else _fhir_change(site, event, position)


def _fhir_change(site: SiteConfig, event: ChangeEvent, position: SourcePosition) -> NormalizedResource | Filtered:
    resource_type, source_id = row_identity(event)
    if resource_type not in site.resource_types:
        if not is_fhir_type(resource_type):
            raise MappingError(f"unknown resource type {resource_type!r}: not a FHIR R4 resource")
        return Filtered(site.site, resource_type)
    resource = None if event.op == "d" else row_to_resource(event)
    if resource is not None:
        validate_resource(resource)
    return NormalizedResource(
        site=site.site,
        resource_type=resource_type,
        source_id=source_id,
        op=_OPS[event.op],
        resource=orjson.dumps(resource).decode() if resource is not None else None,
        content_hash=canonical_hash(resource) if resource is not None else None,
        patient_ref=patient_reference(resource or _deleted_resource(event, resource_type, source_id)),
        source_version=_int_or_none(event.row.get("version")),
        source_lsn=event.lsn,
        source_commit_ms=_commit_ms(event),
        captured_ms=event.captured_ts_ms,
        origin_topic=position.topic,
        origin_partition=position.partition,
        origin_offset=position.offset,
    )


def _withdrawn(site: SiteConfig, event: ChangeEvent, record: NormalizedResource) -> NormalizedResource | None:
    """For a site whose changes flow back to the hospitals (central, `capture`): a version naming another patient
    than the one before it, as a deletion of the one before, under that patient.

    Each change flows back to the hospitals of the patient it names (pipeline/backflow.py). A decision moved to
    another patient (a board correcting whom it is about) would otherwise stay, in its old version, at the
    hospitals of the patient it named before, under that patient. The deletion carries the version before, as
    any deletion: a hospital holding both patients gets the new version whichever arrives first.
    """
    if site.capture is None or record.op != "UPDATE":
        return None
    try:  # the version before (its patient element: pipeline/capture.py), else a stub naming no patient
        before = patient_reference(_deleted_resource(event, record.resource_type, record.source_id))
    except MappingError:
        return None
    if before is None or before == record.patient_ref:
        return None
    return replace(
        record,
        op="DELETE",
        resource=None,
        content_hash=None,
        patient_ref=before,
        source_version=_int_or_none((event.before or {}).get("version")),
    )


def _deleted_resource(event: ChangeEvent, resource_type: str, source_id: str) -> dict[str, object]:
    """The last content of a deleted row when the table keeps full before-images, else a stub (also the version
    before an update, where the change carries it)."""
    content = (event.before or {}).get("content")
    if isinstance(content, str):
        try:
            decoded = orjson.loads(content)
            if isinstance(decoded, dict):
                return {**decoded, "id": source_id}
        except orjson.JSONDecodeError:
            pass
    return {"resourceType": resource_type, "id": source_id}


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | str) and str(value).lstrip("-").isdigit() else None


def _commit_ms(event: ChangeEvent) -> int:
    """When this version was committed at the source.

    For streamed changes that is source.ts_ms. A snapshot read (op r) happens long after the row's
    last commit, so its time is the row's own updated_at (timestamptz → ZonedTimestamp), when present.
    """
    updated_at = event.row.get("updated_at")
    if event.op != "r" or not isinstance(updated_at, str):
        return event.commit_ts_ms
    return int(decode_temporal(updated_at, "zoned_timestamp").timestamp() * 1000)
