"""Back-flow: central's history → Debezium-shaped events; a central decision → each hospital's own form."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.backflow import (
    central_record,
    decided_at_central,
    echo_targets,
    flows_back,
    hospital_form,
    local_patient_id,
    suppressed_routes,
    write_back_records,
    written_version,
)
from pipeline.capture import (
    CaptureCursor,
    HistoryEntry,
    RequestIds,
    advance,
    change_event,
    history_entries,
    is_own_change,
    new_entries,
    query_since,
)
from pipeline.config import load_config
from pipeline.envelope import parse_envelope
from pipeline.identity import route_resource
from pipeline.ids import CDRSYNC_REQUEST_PREFIX, request_id, target_id
from pipeline.normalize import SourcePosition, normalize_change, normalize_changes
from pipeline.records import NormalizedResource, RoutedResource
from pipeline.references import logical_system
from pipeline.resources import patient_part
from tests.casebuilder import decision_response, routed_record
from tests.conftest import ROOT

pytestmark = pytest.mark.unit
CONFIG = load_config(ROOT)
KEY = "0b7c6a52-0000-5000-8000-000000000001"


def _qr(qr_id: str, version: int, updated: str, tags: list[dict[str, str]] | None = None) -> dict[str, Any]:
    body = {**decision_response(f"Patient/{KEY}"), "id": qr_id}
    body["meta"] = {"versionId": str(version), "lastUpdated": updated, **({"tag": tags} if tags else {})}
    return body


def _bundle(*resources: dict[str, Any], deleted: tuple[str, int, str] | None = None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [{"resource": r, "request": {"method": "PUT"}} for r in resources]
    if deleted:
        ref, version, at = deleted
        entries.append(
            {
                "request": {"method": "DELETE", "url": f"{ref}/_history/{version}"},
                "response": {"etag": f'W/"{version}"', "lastModified": at},
            }
        )
    return {"resourceType": "Bundle", "type": "history", "entry": entries}


def test_a_deletion_without_an_instant_is_read_at_the_bundle_s_and_not_left_out() -> None:
    """HAPI 8's _history gives a deleted version no lastModified (as the server answered it, trimmed): it
    was left out, so the board's deletion of a decision never reached the hospitals."""
    bundle = {
        "resourceType": "Bundle",
        "meta": {"lastUpdated": "2026-12-06T21:20:35.439+00:00"},
        "type": "history",
        "entry": [
            {
                "fullUrl": "http://localhost:8080/fhir/QuestionnaireResponse/9a5f",
                "request": {"method": "DELETE", "url": "QuestionnaireResponse/9a5f/_history/4"},
                "response": {"status": "200 OK", "etag": 'W/"4"'},
            },
            {"resource": _qr("9a5f", 3, "2026-12-06T21:17:49.306+00:00"), "request": {"method": "PUT"}},
        ],
    }
    entries = history_entries(bundle)
    assert [(e.resource_id, e.version, e.resource is None) for e in entries] == [("9a5f", 4, True), ("9a5f", 3, False)]
    assert entries[0].last_updated == "2026-12-06T21:20:35.439+00:00"
    cursor = CaptureCursor(since="2026-12-06T21:17:49.306+00:00", seen=["QuestionnaireResponse/9a5f/_history/3"])
    assert [e.key for e in new_entries(entries, cursor, 60_000)] == ["QuestionnaireResponse/9a5f/_history/4"]
    without_meta = history_entries({**bundle, "meta": {}})
    assert without_meta[0].version == 4 and without_meta[0].at_ms > entries[0].at_ms  # the present moment


def test_history_versions_become_debezium_events_the_normalize_stage_reads() -> None:
    entries = history_entries(_bundle(_qr("q1", 1, "2026-11-21T07:00:00.000+00:00")))
    key, value = change_event("central", "fhir", "resource", entries[0], None, now_ms=1)
    assert orjson.loads(key) == {"resource_type": "QuestionnaireResponse", "id": "q1"}
    event = parse_envelope(value)
    assert event is not None and event.op == "c" and event.table == "resource"
    central = CONFIG.sites["central"]
    record = normalize_change(central, value, SourcePosition("cdc.central.fhir.resource", 0, 5))
    assert isinstance(record, NormalizedResource)
    assert record.patient_ref == f"Patient/{KEY}" and record.source_version == 1
    assert record.source_commit_ms == entries[0].at_ms


def test_a_deleted_version_carries_the_last_content_so_its_patient_is_known() -> None:
    entries = history_entries(_bundle(deleted=("QuestionnaireResponse/q1", 3, "2026-11-21T07:00:02.000+00:00")))
    assert entries[0].resource is None and entries[0].version == 3
    previous = _qr("q1", 2, "2026-11-21T07:00:01.000+00:00")
    _, value = change_event("central", "fhir", "resource", entries[0], previous)
    record = normalize_change(CONFIG.sites["central"], value, SourcePosition("t", 0, 0))
    assert isinstance(record, NormalizedResource) and record.is_delete and record.patient_ref == f"Patient/{KEY}"


def test_a_decision_moved_to_another_patient_is_withdrawn_from_the_patient_it_named() -> None:
    """The board corrects whom a decision is about: its new version flows back to the new patient's hospitals,
    and a deletion of the version before to the hospitals of the patient it named, under that patient."""
    other = "0b7c6a52-0000-5000-8000-000000000002"
    moved = {**_qr("q1", 3, "2026-11-21T07:00:02.000+00:00"), "subject": {"reference": f"Patient/{other}"}}
    previous = _qr("q1", 2, "2026-11-21T07:00:01.000+00:00")
    central = CONFIG.sites["central"]

    def records(site: str, version: dict[str, Any]) -> list[NormalizedResource]:
        # as capture gives it: for an update, the version before reduced to the patient it names
        entry = history_entries(_bundle(version))[0]
        _, value = change_event(site, "fhir", "resource", entry, patient_part(previous))
        batch = normalize_changes(CONFIG.sites[site], value, SourcePosition("t", 0, 0))
        assert batch is not None and not batch.problems
        return batch.records

    withdrawn, update = records("central", moved)
    assert (withdrawn.op, withdrawn.patient_ref, withdrawn.source_version) == ("DELETE", f"Patient/{KEY}", 2)
    assert (update.op, update.patient_ref, update.source_version) == ("UPDATE", f"Patient/{other}", 3)
    assert withdrawn.resource is None and withdrawn.source_id == "q1"
    assert flows_back(CONFIG, withdrawn.site)
    copies = write_back_records(CONFIG, PATIENTS, central_record(withdrawn)).records
    assert [(c.target, c.op, c.target_id) for c in copies] == [
        (site, "DELETE", target_id("central", "QuestionnaireResponse", "q1")) for site in ("site-a", "site-b")
    ]
    # The same patient: nothing withdrawn. Nor is a hospital's own change (no copies of it flow back).
    assert [r.op for r in records("central", _qr("q1", 3, "2026-11-21T07:00:02.000+00:00"))] == ["UPDATE"]
    assert [r.op for r in records("site-a", moved)] == ["UPDATE"]
    assert central.capture is not None and CONFIG.sites["site-a"].capture is None


def test_cursor_rereads_its_instant_and_skips_what_it_emitted() -> None:
    t1, t2 = "2026-11-21T07:00:00.000+00:00", "2026-11-21T07:00:01.000+00:00"
    first = new_entries(history_entries(_bundle(_qr("q2", 1, t2), _qr("q1", 1, t1))), CaptureCursor())
    assert [e.resource_id for e in first] == ["q1", "q2"]  # oldest first, whatever the bundle's order
    cursor = advance(CaptureCursor(), first)
    assert cursor.since == t2 and list(cursor.seen_at()) == ["QuestionnaireResponse/q2/_history/1"]
    again = history_entries(_bundle(_qr("q2", 1, t2), _qr("q3", 1, t2), _qr("q2", 2, "2026-11-21T07:00:05Z")))
    assert [(e.resource_id, e.version) for e in new_entries(again, cursor)] == [("q3", 1), ("q2", 2)]


_instants = st.integers(0, 5).map(lambda s: f"2026-11-21T07:00:0{s}.000+00:00")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 4), _instants), max_size=25), st.data())
def test_polling_in_any_slices_emits_every_version_exactly_once(versions: list[Any], data: st.DataObject) -> None:
    unique = {(i, v): at for i, v, at in versions}  # a version has one lastUpdated
    ordered = sorted(((i, v, at) for (i, v), at in unique.items()), key=lambda v: v[2])
    cut_points = sorted(data.draw(st.lists(st.integers(0, len(ordered)), max_size=4)))
    cursor, emitted = CaptureCursor(), []
    for cut in [*cut_points, len(ordered)]:  # the server has the first `cut` versions when polled
        visible = [HistoryEntry("QuestionnaireResponse", i, v, at, {"id": i}) for i, v, at in ordered[:cut]]
        fresh = new_entries(visible, cursor)
        emitted += [e.key for e in fresh]
        cursor = advance(cursor, fresh)
    assert sorted(emitted) == sorted({f"QuestionnaireResponse/{i}/_history/{v}" for i, v, _ in ordered})


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 20)), min_size=1, max_size=25),
    st.lists(st.integers(0, 80), max_size=6),
)
def test_a_version_stamped_before_one_already_read_but_committed_after_it_is_still_emitted_once(
    versions: list[tuple[int, int]], polls: list[int]
) -> None:
    """HAPI stamps lastUpdated when a request starts and shows the version when it commits: a slow edit can
    appear after a later-stamped one was read and the cursor moved past it. Each version here is stamped at
    `at` seconds and becomes visible up to 20 s later (within the 60 s look-back); polls at any moments."""
    stamped = [
        HistoryEntry("QuestionnaireResponse", f"q{i}", 1, f"2026-11-21T07:0{at // 60}:{at % 60:02d}.000+00:00", {})
        for i, (at, _) in enumerate(versions)
    ]
    visible_at = [at + delay for at, delay in versions]
    cursor, emitted = CaptureCursor(), []
    for now in [*sorted(polls), 1_000]:  # the last poll sees everything
        asked = query_since(cursor, 60_000)
        since_ms = None if asked is None else int(datetime.fromisoformat(asked).timestamp() * 1000)
        shown = [  # what the server answers to _since: versions committed by now, stamped at or after it
            e
            for e, t in zip(stamped, visible_at, strict=True)
            if t <= now and (since_ms is None or e.at_ms >= since_ms)
        ]
        fresh = new_entries(shown, cursor, 60_000)
        emitted += [e.key for e in fresh]
        cursor = advance(cursor, fresh, 60_000)
    assert sorted(emitted) == sorted(e.key for e in stamped)


def test_a_cursor_stored_before_the_look_back_is_read_as_seen_at_its_instant() -> None:
    old = CaptureCursor(since="2026-11-21T07:00:01.000+00:00", seen=["QuestionnaireResponse/q2/_history/1"])
    assert old.seen_at() == {"QuestionnaireResponse/q2/_history/1": 1_795_244_401_000}
    assert query_since(old, 60_000) == "2026-11-21T06:59:01.000+00:00"
    assert query_since(old) == old.since and query_since(CaptureCursor(), 60_000) is None
    again = history_entries(_bundle(_qr("q2", 1, old.since), _qr("q1", 1, "2026-11-21T07:00:00.500+00:00")))
    assert [e.resource_id for e in new_entries(again, old, 60_000)] == ["q1"]


def test_versions_cdrsync_wrote_for_a_hospital_are_not_central_changes() -> None:
    hospital = [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]
    assert not is_own_change(_qr("q1", 1, "2026-11-21T07:00:00Z", hospital), "central")
    assert is_own_change(_qr("q1", 1, "2026-11-21T07:00:00Z"), "central")


def test_a_version_is_told_by_its_source_and_a_board_edit_keeping_a_hospital_tag_is_central_s() -> None:
    """HAPI keeps a resource's tags across updates: the board's edit of a QuestionnaireResponse cdrsync wrote
    for site-a still carries site-a's tag. Its meta.source (kept per version) says who wrote that version."""
    hospital = [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]
    written = _qr("q1", 1, "2026-11-21T07:00:00Z", hospital)
    written["meta"]["source"] = "urn:cdrsync:site:site-a#cdrsync-5e0c1a9f"  # HAPI appends the request id
    edited = _qr("q1", 2, "2026-11-21T07:05:00Z", hospital)
    edited["meta"]["source"] = "#h82qgmjCcpQVts1L"  # the board's application sent no source
    by_app = _qr("q1", 3, "2026-11-21T07:06:00Z", hospital)
    by_app["meta"]["source"] = "https://tumour-board.example/app"
    assert not is_own_change(written, "central")
    assert is_own_change(edited, "central")
    assert is_own_change(by_app, "central")


def test_an_application_s_edit_that_writes_back_cdrsync_s_source_is_central_s() -> None:
    """The usual update: read the resource, change it, write it back whole, meta.source included. HAPI keeps
    the source URI sent and appends the request's id, which is the application's (or one HAPI made)."""
    hospital = [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]
    for request in ("h82qgmjCcpQVts1L", "board-app-7731"):
        copied = _qr("q1", 4, "2026-11-21T07:07:00Z", hospital)
        copied["meta"]["source"] = f"urn:cdrsync:site:site-a#{request}"
        assert is_own_change(copied, "central"), request
    kept_as_sent = _qr("q1", 5, "2026-11-21T07:08:00Z", hospital)
    kept_as_sent["meta"]["source"] = "urn:cdrsync:site:site-a"  # a server that appends no request id
    assert not is_own_change(kept_as_sent, "central")


def test_while_the_server_gets_no_request_ids_versions_are_judged_by_their_source_uri() -> None:
    """Through a proxy that drops X-Request-ID, cdrsync's own writes carry ids the server made: judged by
    request id they would come back as central's changes. So they are judged by URI until well after the ids
    arrive again (versions written meanwhile may be cdrsync's, read later)."""
    hospital = [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]
    unmarked = _qr("q1", 2, "2026-11-21T07:00:05Z", hospital)
    unmarked["meta"]["source"] = "urn:cdrsync:site:site-a#h82qgmjCcpQVts1L"  # cdrsync's write, the id HAPI's
    assert not is_own_change(unmarked, "central", by_request_id=False)
    assert is_own_change(unmarked, "central", by_request_id=True)

    start = 1_795_244_400.0  # 2026-11-21T07:00:00Z
    ids = RequestIds()
    assert not ids.by_request_id("2026-11-21T07:00:01.000+00:00")  # not checked yet
    ids.note(True, start, margin=9.0)
    assert ids.by_request_id("2026-11-21T07:00:01.000+00:00")  # never lost: every version by its request id
    ids.note(False, start + 60, margin=9.0)
    assert not ids.by_request_id("2026-11-21T07:01:05.000+00:00")
    ids.note(False, start + 62, margin=9.0)
    ids.note(True, start + 64, margin=9.0)  # arrives again: up to 07:01:13 still by URI
    assert not ids.by_request_id("2026-11-21T07:01:03.500Z")
    assert not ids.by_request_id("2026-11-21T07:01:13.000+00:00")
    assert ids.by_request_id("2026-11-21T07:01:13.100+00:00")
    ids.note(True, start + 200, margin=9.0)  # kept since: the window stays where it was
    assert ids.by_request_id("2026-11-21T07:01:14.000+00:00")
    ids.note(None, start + 300, margin=9.0)  # a server that does not say: by URI
    assert not ids.by_request_id("2026-11-21T07:05:00.000+00:00")
    assert not RequestIds(kept=True).by_request_id("not an instant")


def test_every_request_to_a_fhir_server_carries_a_request_id_of_cdrsync_s() -> None:
    ids = {request_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith(CDRSYNC_REQUEST_PREFIX) and len(i) == 16 for i in ids)  # HAPI keeps 16 characters


def _central_record(op: str = "CREATE") -> RoutedResource:
    body = {**decision_response(f"Patient/{KEY}"), "id": "q1", "encounter": {"reference": "Encounter/e-central"}}
    return routed_record(
        body, site="central", target="", patient_key=KEY, op=op, source_version=None, content_hash=None
    )


def _patient_version(site: str, local: str) -> str:
    identifiers = [{"system": logical_system(site, "Patient"), "value": local}]
    return orjson.dumps({"resourceType": "Patient", "id": KEY, "identifier": identifiers}).decode()


VERSIONS = {"site-a": _patient_version("site-a", "a-17"), "site-b": _patient_version("site-b", "b-4711")}
PATIENTS = {KEY: {"sites": ["site-a", "site-b"], "versions": VERSIONS}}


def test_a_central_decision_goes_to_every_contributing_hospital_in_its_own_patient_id() -> None:
    out = write_back_records(CONFIG, PATIENTS, _central_record())
    assert [r.target for r in out.records] == ["site-a", "site-b"] and out.missing == []
    for record, local in zip(out.records, ["a-17", "b-4711"], strict=True):
        body = orjson.loads(record.resource or "")
        assert body["subject"] == {"reference": f"Patient/{local}"}
        assert body["id"] == record.target_id == target_id("central", "QuestionnaireResponse", "q1")
        assert body["encounter"] == {
            "type": "Encounter",
            "identifier": {"system": logical_system("central", "Encounter"), "value": "e-central"},
        }
        assert body["identifier"] == {"system": logical_system("central", "QuestionnaireResponse"), "value": "q1"}
        assert echo_targets(record.resource) == {"central"}


def test_delete_flows_back_and_unknown_patients_go_nowhere_silently() -> None:
    deletes = write_back_records(CONFIG, PATIENTS, _central_record("DELETE"))
    assert [(r.target, r.op, r.resource) for r in deletes.records] == [
        ("site-a", "DELETE", None),
        ("site-b", "DELETE", None),
    ]
    nobody = write_back_records(CONFIG, {}, _central_record())
    assert nobody.records == [] and nobody.missing == []  # the agent dead-letters this (no hospital)


def test_a_written_back_row_captured_at_the_hospital_is_never_routed_back_to_central() -> None:
    body = hospital_form(orjson.loads(_central_record().resource or ""), "central", KEY, "a-17")
    record = NormalizedResource(
        0, 0, "cdc.site-a.fhir.resource", 0, 0, site="site-a", resource_type="QuestionnaireResponse",
        source_id=body["id"], resource=orjson.dumps(body).decode(), patient_ref="Patient/a-17",
    )  # fmt: skip
    assert route_resource(record, CONFIG.sites["site-a"], lambda _: KEY) == []
    assert suppressed_routes(record, CONFIG.sites["site-a"]) == ["central"]
    own = NormalizedResource(**{**record.__dict__, "resource": orjson.dumps({**body, "meta": {}}).decode()})
    assert [r.target for r in route_resource(own, CONFIG.sites["site-a"], lambda _: KEY)] == ["central"]


def test_central_is_a_back_flow_source_and_hospitals_are_not() -> None:
    assert flows_back(CONFIG, "central") and not flows_back(CONFIG, "site-a")
    assert local_patient_id(_patient_version("site-b", "b-4711"), "site-b") == "b-4711"
    assert local_patient_id(_patient_version("site-b", "b-4711"), "site-a") is None


def test_each_hospital_record_names_the_central_version_it_was_made_from() -> None:
    """The tag lets the hospital's table refuse a late (replayed) version over a newer one."""
    record = replace(_central_record(), source_version=7)
    out = write_back_records(CONFIG, PATIENTS, record)
    assert [written_version(orjson.loads(r.resource or "")) for r in out.records] == [7, 7]
    again = hospital_form(orjson.loads(out.records[0].resource or ""), "central", KEY, "a-17", 8)
    assert written_version(again) == 8  # made again from a newer version: one tag, the newer one
    assert [t["system"] for t in again["meta"]["tag"]].count("urn:cdrsync:source-version") == 1
    assert (
        written_version(orjson.loads(write_back_records(CONFIG, PATIENTS, _central_record()).records[0].resource or ""))
        is None
    )
    assert written_version({"meta": {"tag": [{"system": "urn:cdrsync:source-version", "code": "x"}]}}) is None


def test_a_copy_holding_the_tags_of_earlier_versions_is_of_the_highest() -> None:
    """HAPI keeps a resource's earlier tags when it is updated: the copy then carries 2 and 3 and is of 3."""
    tag = "urn:cdrsync:source-version"
    tags = [{"system": tag, "code": "2"}, {"system": "other", "code": "9"}, {"system": tag, "code": "3"}]
    kept = {"meta": {"tag": tags}}
    assert written_version(kept) == 3


def test_a_hospital_version_a_reviewer_took_is_written_as_central_s_where_central_s_decisions_flow_back() -> None:
    """`conflicts resolve --take-incoming`: the version written is central's decision; central's capture takes it for
    one of its own changes (is_own_change) only if its meta.source names central, not the hospital."""
    form = {**decision_response("Patient/pk"), "id": "qr1", "meta": {"source": "urn:cdrsync:site:site-a"}}
    taken = decided_at_central(CONFIG, routed_record(form, patient_key="pk"))
    written = orjson.loads(taken.resource or "")
    assert written["meta"]["source"] == "urn:cdrsync:site:central"
    assert is_own_change(written, "central") and not is_own_change(form, "central")
    assert {k: v for k, v in written.items() if k != "meta"} == {k: v for k, v in form.items() if k != "meta"}
    weight = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "w"}}
    observation = routed_record({**weight, "meta": {"source": "urn:cdrsync:site:site-a"}}, patient_key="pk")
    assert decided_at_central(CONFIG, observation) == observation  # central's Observations do not flow back
    elsewhere = routed_record(form, patient_key="pk", target="site-b")
    assert decided_at_central(CONFIG, elsewhere) == elsewhere  # a target without capture
