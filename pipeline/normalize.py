"""Stage 1: a Debezium change of a site table → one validated FHIR R4 resource (NormalizedResource)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from .adapters.fhir import row_identity, row_to_resource
from .config import SiteConfig
from .envelope import ChangeEvent, decode_temporal, parse_envelope
from .errors import EnvelopeError, MappingError, OversizeError
from .records import NormalizedResource, canonical_hash
from .resources import is_fhir_type, patient_reference, validate_resource

__all__ = ["Filtered", "SourcePosition", "normalize_change"]

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


def normalize_change(
    site: SiteConfig, value: bytes | None, position: SourcePosition, max_bytes: int | None = None
) -> NormalizedResource | Filtered | None:
    """Decode, map and validate one change; None for a tombstone. Raises PermanentError on bad input."""
    if value is not None and max_bytes is not None and len(value) > max_bytes:
        raise OversizeError(f"change record of {len(value)} bytes exceeds the limit of {max_bytes} bytes")
    event = parse_envelope(value)
    if event is None:
        return None
    if site.source is not None and (event.schema, event.table) != (
        site.source.schema_name,
        site.source.table,
    ):
        raise EnvelopeError(f"change of {event.schema}.{event.table}, not the site's source table")
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


def _deleted_resource(event: ChangeEvent, resource_type: str, source_id: str) -> dict[str, object]:
    """The last content of a deleted row when the table keeps full before-images, else a stub."""
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
