"""Audit events of records a stage could not pass on (pipeline/audit.py failure_event): every dead letter and
retry is audited, named as well as the record allows, with no patient data."""

from __future__ import annotations

import orjson
import pytest

from pipeline.audit import failure_event
from pipeline.records import encode
from tests.casebuilder import observation_for, routed_record
from tests.conftest import debezium_value

pytestmark = pytest.mark.unit

ORIGIN = ("cdc.site-a.fhir.resource", 2, 41)


def test_a_record_of_ours_is_named_by_its_own_fields() -> None:
    resource = observation_for("t", "t-pat-0", 1, 70.5)
    record = routed_record(resource, patient_key="k1", origin=ORIGIN, source_lsn=99)
    event = failure_event(
        "dead_lettered", encode(record), ("fhir.sink.retry.1h", 0, 3), site="site-a", detail="sink http_500: boom"
    )
    assert {k: event[k] for k in ("step", "site", "target", "resource_type", "source_id", "target_id")} == {
        "step": "dead_lettered",
        "site": "site-a",
        "target": "central",
        "resource_type": "Observation",
        "source_id": "t-obs-1",
        "target_id": "t-obs-1",
    }
    assert (event["source_lsn"], event["content_hash"]) == (99, record.content_hash)
    assert event["origin"] == "cdc.site-a.fhir.resource[2]@41"  # where it came from, not the retry tier
    assert event["detail"] == "sink http_500: boom"


def test_a_source_change_is_named_by_its_row_and_position() -> None:
    row = {"resource_type": "DocumentReference", "id": "doc-7", "version": 1, "content": '{"secret": "x"}'}
    event = failure_event(
        "dead_lettered",
        debezium_value("u", None, row, lsn=777, ts_ms=1_700_000_000_123),
        ORIGIN,
        site="site-a",
        detail="normalize mapping: invalid FHIR R4 DocumentReference: content: Field required",
    )
    assert (event["resource_type"], event["source_id"], event["site"]) == ("DocumentReference", "doc-7", "site-a")
    assert (event["source_lsn"], event["source_commit_ms"]) == (777, 1_700_000_000_123)
    assert event["origin"] == "cdc.site-a.fhir.resource[2]@41" and event["target_id"] is None
    assert "secret" not in orjson.dumps(event).decode()  # the row's content is never copied


@pytest.mark.parametrize("value", [None, b"", b'{"not": "a debezium envelope"', b"\x00\x01garbage", b"[1, 2]"])
def test_a_record_that_cannot_be_read_is_named_by_where_it_was_read(value: bytes | None) -> None:
    event = failure_event("dead_lettered", value, ORIGIN, site="site-a", detail="normalize envelope: " + "x" * 600)
    assert (event["source_id"], event["origin"]) == ("cdc.site-a.fhir.resource[2]@41",) * 2
    assert event["resource_type"] == "" and event["site"] == "site-a"
    assert len(event["detail"]) == 500


def test_a_composition_is_named_by_its_uid() -> None:
    row = {"uid": "8a0f-compo", "system_id": "site-d.example", "version": 2, "content": "{}"}
    event = failure_event("dead_lettered", debezium_value("c", None, row), ORIGIN, site="site-d", detail="x")
    assert (event["source_id"], event["resource_type"]) == ("8a0f-compo", "")


def test_what_a_fhir_server_quotes_is_cut_from_the_detail() -> None:
    """A target's diagnostics can quote the rejected value (a name, a birth date): not kept in the audit store."""
    record = routed_record(observation_for("t", "t-pat-0", 1, 70.5), patient_key="k1", origin=ORIGIN)
    detail = 'sink rejected_by_target: target rejected the PUT (400): HAPI-1821: value "Doe, Jane": "1970-13-45"'
    for value in (encode(record), b"garbage"):
        event = failure_event("dead_lettered", value, ORIGIN, site="site-a", detail=detail)
        assert "Doe" not in event["detail"] and "1970" not in event["detail"]
        assert event["detail"].startswith("sink rejected_by_target: target rejected the PUT (400): HAPI-1821")
