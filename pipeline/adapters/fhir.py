"""The `fhir` adapter: a table of FHIR JSON documents (resource_type, id, version, content)."""

from __future__ import annotations

from typing import Any

import orjson

from ..envelope import ChangeEvent, resolve_toast
from ..errors import EnvelopeError, MappingError

__all__ = ["row_identity", "row_to_resource"]


def row_identity(event: ChangeEvent) -> tuple[str, str]:
    """(resource_type, id) of the changed row; present in every op, deletes included."""
    row = event.row
    resource_type, source_id = row.get("resource_type"), row.get("id")
    if not isinstance(resource_type, str) or not isinstance(source_id, str) or not source_id:
        raise EnvelopeError("row lacks the 'resource_type' and 'id' columns of a fhir adapter table")
    return resource_type, source_id


def row_to_resource(event: ChangeEvent) -> dict[str, Any]:
    """Row content (jsonb, which Debezium sends as a JSON string) → the resource it holds."""
    resource_type, source_id = row_identity(event)
    content = resolve_toast(event, "content")
    if isinstance(content, str):
        try:
            content = orjson.loads(content)
        except orjson.JSONDecodeError as exc:
            raise MappingError(f"content is not JSON: {exc}") from None
    if not isinstance(content, dict):
        raise MappingError("content is not a JSON object")
    if content.get("resourceType") != resource_type:
        raise MappingError(
            f"content resourceType {content.get('resourceType')!r} differs from the row's {resource_type!r}"
        )
    if content.get("id", source_id) != source_id:
        raise MappingError(f"content id {content.get('id')!r} differs from the row id {source_id!r}")
    return {**content, "id": source_id}
