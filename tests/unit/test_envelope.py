import pytest

from pipeline.envelope import UNAVAILABLE_VALUE, parse_envelope, resolve_toast
from pipeline.errors import EnvelopeError
from tests.conftest import debezium_value, first_of, row

pytestmark = pytest.mark.unit
PATIENT = first_of("ADT-A01-01", "Patient")


@pytest.mark.parametrize("op", ["c", "r", "u"])
def test_create_snapshot_update_carry_the_after_image(op: str) -> None:
    event = parse_envelope(debezium_value(op, row(PATIENT) if op == "u" else None, row(PATIENT, 2)))
    assert event is not None
    assert event.op == op
    assert event.row["version"] == 2
    assert event.snapshot is (op == "r")
    assert (event.lsn, event.commit_ts_ms, event.captured_ts_ms) == (24023928, 1700000000000, 1700000000035)
    assert (event.database, event.schema, event.table) == ("site_a", "fhir", "resource")


def test_delete_carries_the_before_image() -> None:
    event = parse_envelope(debezium_value("d", row(PATIENT), None))
    assert event is not None and event.op == "d"
    assert event.row["id"] == PATIENT["id"]


def test_tombstone_is_none() -> None:
    assert parse_envelope(None) is None


def test_schemas_enabled_payload_is_unwrapped() -> None:
    import orjson

    wrapped = orjson.dumps(
        {"schema": {"type": "struct"}, "payload": orjson.loads(debezium_value("c", None, row(PATIENT)))}
    )
    event = parse_envelope(wrapped)
    assert event is not None and event.row["id"] == PATIENT["id"]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"op": "t", "source": {"ts_ms": 1}}', "unsupported op 't'"),
        (b'{"op": "c", "after": {"id": "1"}}', "missing 'source'"),
        (b'{"op": "d", "before": null, "source": {"ts_ms": 1}}', "delete without a 'before'"),
        (b'{"op": "c", "after": {"id": "1"}, "source": {"ts_ms": "soon"}}', "malformed 'source'"),
    ],
)
def test_malformed_envelopes_name_the_reason(value: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        parse_envelope(value)


def test_unchanged_toast_value_is_taken_from_the_before_image() -> None:
    before = row(PATIENT, 1)
    after = {**row(PATIENT, 2), "content": UNAVAILABLE_VALUE}
    event = parse_envelope(debezium_value("u", before, after))
    assert event is not None
    assert resolve_toast(event, "content") == before["content"]


def test_unchanged_toast_value_without_before_image_is_an_error() -> None:
    event = parse_envelope(debezium_value("u", None, {**row(PATIENT, 2), "content": UNAVAILABLE_VALUE}))
    assert event is not None
    with pytest.raises(EnvelopeError, match="REPLICA IDENTITY FULL"):
        resolve_toast(event, "content")


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        (20778, "date", "2026-11-21T00:00:00+00:00"),  # date: days since the epoch
        (1795235514452, "timestamp", "2026-11-21T04:31:54.452000+00:00"),  # timestamp(3): ms
        (1795235514452819, "micro_timestamp", "2026-11-21T04:31:54.452819+00:00"),  # timestamp: µs
        (1795235514452819123, "nano_timestamp", "2026-11-21T04:31:54.452819+00:00"),
        ("2026-11-21T04:31:54.452203Z", "zoned_timestamp", "2026-11-21T04:31:54.452203+00:00"),  # timestamptz
        (-1, "date", "1969-12-31T00:00:00+00:00"),
    ],
)
def test_temporal_values_as_debezium_encodes_them(value, kind, expected) -> None:
    from pipeline.envelope import decode_temporal

    assert decode_temporal(value, kind).isoformat() == expected


def test_bad_temporal_value_is_an_envelope_error() -> None:
    from pipeline.envelope import decode_temporal

    with pytest.raises(EnvelopeError, match="not a Debezium zoned_timestamp"):
        decode_temporal("yesterday", "zoned_timestamp")
