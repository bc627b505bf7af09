import pytest

from pipeline.errors import SchemaError
from pipeline.records import NormalizedResource, RoutedResource, decode, decode_any, encode, schema_fingerprint

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
