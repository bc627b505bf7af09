"""Our own topics' records and their Avro encoding.

Every value is Avro single-object encoded (Avro 1.11 spec, "Single-object encoding"): the two
marker bytes C3 01, the schema's 8-byte CRC-64-AVRO fingerprint (little-endian), then the binary
datum. A reader finds the writer's schema by that fingerprint among the files in schemas/; no
schema registry is needed. The fingerprint is also in the `cdrsync-schema` header, in hex.

Superseded versions of a schema stay in schemas/history/<name>.<fingerprint>.avsc: a record written
before an upgrade is read with its writer schema and resolved to the current one (Avro schema
resolution), so evolving a schema (only adding fields with defaults) never strands records in topics.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import fastavro
import orjson
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from .errors import SchemaError

__all__ = [
    "SCHEMA_DIR",
    "NormalizedResource",
    "RoutedResource",
    "canonical_hash",
    "decode",
    "decode_any",
    "decode_resource",
    "encode",
    "schema_fingerprint",
]

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_MAGIC = b"\xc3\x01"


def canonical_hash(resource: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no whitespace) of a resource."""
    return hashlib.sha256(orjson.dumps(resource, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True)
class _Origin:
    """Where a record came from: the source commit and the Debezium record."""

    source_commit_ms: int
    captured_ms: int
    origin_topic: str
    origin_partition: int
    origin_offset: int
    source_version: int | None = None
    source_lsn: int | None = None


@dataclass(frozen=True)
class NormalizedResource(_Origin):
    """A validated resource as its source site holds it (fhir.normalized.v1)."""

    schema_name: ClassVar[str] = "normalized_resource"
    site: str = ""
    resource_type: str = ""
    source_id: str = ""
    op: str = "CREATE"
    resource: str | None = None
    content_hash: str | None = None
    patient_ref: str | None = None

    @property
    def is_delete(self) -> bool:
        """True for a deletion at the source."""
        return self.op == "DELETE"


@dataclass(frozen=True)
class RoutedResource(_Origin):
    """A resource in target ids, bound for one target (fhir.identified.v1, fhir.ready.v1)."""

    schema_name: ClassVar[str] = "routed_resource"
    site: str = ""
    target: str = ""
    resource_type: str = ""
    source_id: str = ""
    target_id: str = ""
    patient_key: str = ""
    op: str = "CREATE"
    resource: str | None = None
    content_hash: str | None = None
    dependencies: list[str] = field(default_factory=list)
    delete_with: list[str] = field(default_factory=list)
    #: for a DELETE: the source LSN of a change the target must hold first (pipeline/sink.py `_delete`)
    awaits_lsn: int | None = None
    #: for a DELETE with delete_with: the same for each other resource of the group, {"ref", "row", "lsn"}
    awaits_with: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_delete(self) -> bool:
        """True for a deletion at the source."""
        return self.op == "DELETE"

    @property
    def target_ref(self) -> str:
        """The resource's reference at the target: Type/id."""
        return f"{self.resource_type}/{self.target_id}"

    @classmethod
    def of(cls, record: NormalizedResource, **routing: Any) -> RoutedResource:
        """`record`'s change bound for a target: where it came from (every origin field) and what it is (site,
        type, source id, operation, content) carried over; `routing` sets the rest (target, target_id,
        patient_key, ...) and may replace what is carried (the content in target form, its hash)."""
        carried: dict[str, Any] = {f.name: getattr(record, f.name) for f in fields(_Origin)}
        for name in ("site", "resource_type", "source_id", "op", "resource", "content_hash"):
            carried[name] = getattr(record, name)
        return cls(**(carried | routing))


Record = TypeVar("Record", NormalizedResource, RoutedResource)
_TYPES: dict[str, type[NormalizedResource] | type[RoutedResource]] = {
    "normalized_resource": NormalizedResource,
    "routed_resource": RoutedResource,
}


def _parse(path: Path) -> tuple[Any, bytes]:
    parsed = parse_schema(json.loads(path.read_text(encoding="utf-8")))
    digest = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return parsed, digest[::-1]  # the spec writes the 64-bit fingerprint little-endian


@cache
def _schema(name: str) -> tuple[Any, bytes]:
    return _parse(SCHEMA_DIR / f"{name}.avsc")


@cache
def _by_fingerprint() -> dict[bytes, tuple[str, Any]]:
    """Fingerprint → (schema name, writer schema), current and historical versions."""
    known = {}
    for path in SCHEMA_DIR.glob("history/*.avsc"):
        parsed, digest = _parse(path)
        known[digest] = (path.name.split(".", 1)[0], parsed)
    for path in SCHEMA_DIR.glob("*.avsc"):
        parsed, digest = _schema(path.stem)  # the same object decode_any compares with
        known[digest] = (path.stem, parsed)
    return known


def schema_fingerprint(name: str) -> str:
    """Hex of the single-object-encoding fingerprint of a schema in schemas/."""
    return _schema(name)[1].hex()


def encode(record: NormalizedResource | RoutedResource) -> bytes:
    """Avro single-object encoding of a record."""
    parsed, digest = _schema(record.schema_name)
    buffer = io.BytesIO()
    buffer.write(_MAGIC + digest)
    # A shallow dict (asdict deep-copies every field, and the fields are plain values anyway).
    fastavro.schemaless_writer(buffer, parsed, {name: getattr(record, name) for name in _field_names(type(record))})
    return buffer.getvalue()


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(kind: type) -> tuple[str, ...]:
    if kind not in _FIELD_NAMES:
        _FIELD_NAMES[kind] = tuple(f.name for f in fields(kind))
    return _FIELD_NAMES[kind]


def decode_any(data: bytes) -> tuple[str, dict[str, Any]]:
    """Decode any of our records: (schema name, datum)."""
    if len(data) < 10 or data[:2] != _MAGIC:
        raise SchemaError("not an Avro single-object encoded record (bad marker)")
    known = _by_fingerprint().get(data[2:10])
    if known is None:
        raise SchemaError(f"unknown schema fingerprint {data[2:10].hex()}")
    name, writer = known
    reader = _schema(name)[0]
    try:
        # Schema resolution only for a record written with an older schema (schemas/history/).
        resolve = reader if writer is not reader else None
        datum: Any = fastavro.schemaless_reader(io.BytesIO(data[10:]), writer, resolve)
    except Exception as exc:  # fastavro raises several unrelated types on corrupt input
        raise SchemaError(f"cannot decode {name}: {exc!r}") from None
    return name, datum


def decode(data: bytes, kind: type[Record]) -> Record:
    """Decode a record that must be of the given type."""
    name, datum = decode_any(data)
    if name != kind.schema_name:
        raise SchemaError(f"expected {kind.schema_name}, got {name}")
    return _from_datum(kind, datum)


def decode_resource(data: bytes) -> NormalizedResource | RoutedResource:
    """Decode a normalized or a routed resource, whichever it is (SchemaError for anything else)."""
    name, datum = decode_any(data)
    if name == NormalizedResource.schema_name:
        return _from_datum(NormalizedResource, datum)
    if name == RoutedResource.schema_name:
        return _from_datum(RoutedResource, datum)
    raise SchemaError(f"expected a normalized or routed resource, got {name}")


def _from_datum(kind: type[Record], datum: dict[str, Any]) -> Record:
    names = _field_names(kind)
    return kind(**{k: v for k, v in datum.items() if k in names})
