from pathlib import Path

import pytest

from pipeline.errors import SchemaError
from pipeline.records import (
    SCHEMA_DIR,
    NormalizedResource,
    RoutedResource,
    decode,
    decode_any,
    encode,
    schema_fingerprint,
)

pytestmark = pytest.mark.unit
RECORD = NormalizedResource(
    source_commit_ms=1,
    captured_ms=2,
    origin_topic="cdc.site-a.fhir.resource",
    origin_partition=1,
    origin_offset=9,
    site="site-a",
    resource_type="Patient",
    source_id="p1",
    op="UPDATE",
    resource='{"resourceType":"Patient"}',
    content_hash="ab",
    patient_ref="Patient/p1",
    source_version=2,
    source_lsn=77,
)


def test_round_trip_and_single_object_header() -> None:
    data = encode(RECORD)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10].hex() == schema_fingerprint("normalized_resource")
    assert decode(data, NormalizedResource) == RECORD
    assert decode_any(data)[0] == "normalized_resource"


def test_wrong_record_type_and_garbage_are_schema_errors() -> None:
    with pytest.raises(SchemaError, match="expected routed_resource"):
        decode(encode(RECORD), RoutedResource)
    with pytest.raises(SchemaError, match="bad marker"):
        decode_any(b'{"json": true}')
    with pytest.raises(SchemaError, match="unknown schema fingerprint"):
        decode_any(b"\xc3\x01" + b"\x00" * 8 + b"\x02")


@pytest.mark.parametrize(
    "old", sorted(Path(SCHEMA_DIR, "history").glob("routed_resource.*.avsc")), ids=lambda path: path.name
)
def test_records_written_with_a_superseded_schema_still_decode(old: Path) -> None:
    import io
    import json

    import fastavro

    writer = fastavro.parse_schema(json.loads(old.read_text()))
    datum = {
        "site": "site-a",
        "target": "central",
        "resource_type": "Patient",
        "source_id": "p1",
        "target_id": "t1",
        "patient_key": "t1",
        "op": "DELETE",
        "resource": None,
        "content_hash": None,
        "dependencies": [],
        "source_version": 3,
        "source_lsn": 9,
        "source_commit_ms": 1,
        "captured_ms": 2,
        "origin_topic": "x",
        "origin_partition": 0,
        "origin_offset": 4,
    }
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, datum)
    record = decode(b"\xc3\x01" + bytes.fromhex(old.name.split(".")[1]) + buffer.getvalue(), RoutedResource)
    assert record.target_ref == "Patient/t1" and record.delete_with == [] and record.source_version == 3
