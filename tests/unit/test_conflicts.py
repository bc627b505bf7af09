"""Version conflicts: the version kept per resource, recognising our own write, the conflict record and decisions."""

from __future__ import annotations

import base64
from dataclasses import replace

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.blocking import Queued, SinkOrder, TargetVersions
from pipeline.conflicts import RESOLUTION_HEADER, Conflict, conflict_record, differing_fields, parse_resolution
from pipeline.errors import EnvelopeError
from pipeline.records import RoutedResource
from pipeline.sink import CONTENT_HASH_EXTENSION, _newer, body_to_write, is_our_write, untouched_write
from tests.casebuilder import routed_record

pytestmark = pytest.mark.unit
REF = "Observation/o1"


def _record(value: float) -> RoutedResource:
    body = {"resourceType": "Observation", "id": "o1", "status": "final", "valueQuantity": {"value": value}}
    return routed_record(body, patient_key="pk", origin=("ready", 3, 17), source_version=2, source_lsn=1234)


def test_the_version_lives_in_the_sink_entry_and_survives_its_queue_changes() -> None:
    table: dict = {}
    versions, order = TargetVersions(table), SinkOrder(table)
    assert versions.get(REF) is None and len(versions) == 0
    versions[REF] = {"version": "3"}
    assert order.route(REF, "ready[0]@1") == "write"  # a known version blocks nothing
    order.failed(REF, "ready[0]@1", "retrying", now_ms=1)
    order.enqueue(REF, Queued("ready[0]@2", b"k", b"v", ("ready", 0, 2)))
    order.note_written(REF, "site-a|o1", 10)
    assert versions[REF] == {"version": "3"}
    order.written(REF, "ready[0]@1")
    assert versions[REF] == {"version": "3"} and list(versions) == [REF]
    assert versions.pop(REF) == {"version": "3"}  # a delete forgets it
    assert versions.get(REF) is None and table[REF]["blocker"] == "ready[0]@2"  # its order state is kept


def test_our_own_write_is_recognised_by_hash_and_content() -> None:
    sent = orjson.loads(body_to_write(_record(70.0)))
    at_target = {**sent, "meta": {"versionId": "4", "lastUpdated": "2026-11-21T10:00:00Z"}}
    assert is_our_write(sent, at_target)


def test_an_edit_that_kept_our_hash_extension_is_not_taken_for_our_write() -> None:
    sent = orjson.loads(body_to_write(_record(70.0)))
    edited = {**sent, "valueQuantity": {"value": 72.5}, "meta": {"versionId": "5"}}
    assert any(e["url"] == CONTENT_HASH_EXTENSION for e in edited["extension"])
    assert not is_our_write(sent, edited)
    assert not is_our_write(sent, None)  # deleted at the target meanwhile
    other = orjson.loads(body_to_write(_record(71.0)))
    assert not is_our_write(sent, {**other, "meta": {"versionId": "5"}})


def test_the_conflict_record_holds_both_versions_and_the_record_to_resolve_it() -> None:
    record = _record(69.0)
    current = {"resourceType": "Observation", "id": "o1", "valueQuantity": {"value": 72.5}, "meta": {"versionId": "5"}}
    value = orjson.loads(conflict_record(record, b"avro-bytes", ("ready", 3, 17), "412", current, "4", 99))
    assert value["incoming"]["valueQuantity"]["value"] == 69.0
    assert value["current"]["valueQuantity"]["value"] == 72.5
    assert (value["our_last_version"], value["current_version"]) == ("4", "5")
    assert base64.b64decode(value["record"]) == b"avro-bytes"
    assert value["origin"] == {"topic": "ready", "partition": 3, "offset": 17}
    summary = Conflict(3, 8, b"pk", value).summary()
    assert summary["id"] == "3:8" and summary["status"] == "open"
    assert summary["differing_fields"] == ["status", "valueQuantity"]
    assert "69.0" not in orjson.dumps(Conflict(3, 8, b"pk", value).shown(False)).decode()  # no clinical content


def test_differing_fields_ignore_meta_and_cdrsyncs_own_extensions() -> None:
    a = {"id": "x", "meta": {"versionId": "1"}, "status": "final", "extension": [{"url": CONTENT_HASH_EXTENSION}]}
    b = {"id": "x", "meta": {"versionId": "2"}, "status": "final"}
    assert differing_fields(a, b) == []
    assert differing_fields({**a, "note": [{"text": "x"}]}, b) == ["note"]


@given(st.sampled_from(["take-incoming", "keep-target"]), st.from_regex(r"[0-9A-Za-z.-]{1,12}", fullmatch=True))
def test_a_decision_header_round_trips(decision: str, version: str) -> None:
    headers = [("other", b"x"), (RESOLUTION_HEADER, f"{decision}:{version}".encode())]
    assert parse_resolution(headers) == (decision, version)


@pytest.mark.parametrize("raw", [b"overwrite:3", b"keep-target:", b"take-incoming"])
def test_a_malformed_decision_header_is_an_envelope_error(raw: bytes) -> None:
    with pytest.raises(EnvelopeError, match="malformed"):
        parse_resolution([(RESOLUTION_HEADER, raw)])
    assert parse_resolution([("cdrsync-replay-of", b"1:2")]) is None


def _as_stored(record: RoutedResource, version: str) -> dict:
    """What HAPI gives back for a body cdrsync sent: meta rewritten, keys in its own order."""
    sent = orjson.loads(body_to_write(record))
    meta = {"versionId": version, "lastUpdated": "2026-11-21T10:41:13.176+00:00", "source": "urn:x#6SWfL1qKPGQdpZY9"}
    return {"meta": meta, **dict(reversed(list({k: v for k, v in sent.items() if k != "meta"}.items())))}


def test_a_write_of_ours_is_recognised_untouched_with_its_row_and_position() -> None:
    stored = _as_stored(_record(90.0), "2")
    assert untouched_write(stored) == ("site-a|o1", 1234)
    edited = {**stored, "valueQuantity": {"value": 91.0}}  # a clinician's edit keeps both extensions
    assert untouched_write(edited) is None
    assert untouched_write({"resourceType": "Observation", "id": "o1"}) is None  # never written by cdrsync


def test_a_lost_version_of_ours_is_told_apart_from_a_later_one() -> None:
    later = _as_stored(replace(_record(90.0), source_lsn=2000), "2")
    mark = untouched_write(later)
    assert mark is not None
    assert _newer(mark, _record(55.0))  # LSN 1234 re-read after 2000 was written: leave 2000 in place
    assert not _newer(mark, replace(_record(55.0), source_lsn=3000))  # a later change: write over it
    assert not _newer(mark, replace(_record(55.0), source_id="o2"))  # another row: not comparable by LSN
