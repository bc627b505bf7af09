"""A tumour-board decision written at central flows back to both hospitals, in their own patient ids, once."""

from __future__ import annotations

import urllib.request
from typing import Any

import orjson
import psycopg
import pytest

from pipeline.cli import main as cdrsync
from pipeline.identity import ORIGIN_TAG_SYSTEM, global_patient_key
from pipeline.ids import target_id
from pipeline.references import logical_system
from tests.casebuilder import decision_response, encounter_for, observation_for, tumorboard_flag, with_kvnr
from tests.integration.conftest import (
    KVNR_SYSTEM,
    SETTINGS,
    Central,
    SiteDatabase,
    Worker,
    audit_rows,
    central_id,
    patient_at_both_hospitals,
    wait_for,
)

pytestmark = pytest.mark.integration


def _row(site: SiteDatabase, resource_type: str, row_id: str) -> tuple[dict[str, Any], int] | None:
    with site.conn.cursor() as cursor:
        cursor.execute(
            "SELECT content, version FROM fhir.resource WHERE resource_type = %s AND id = %s", (resource_type, row_id)
        )
        row = cursor.fetchone()
    return (row[0], row[1]) if row else None


def _row_in_status(site: SiteDatabase, row_id: str, status: str) -> tuple[dict[str, Any], int] | None:
    row = _row(site, "QuestionnaireResponse", row_id)
    return row if row and row[0]["status"] == status else None


def _sites_with_step(source_id: str, step: str) -> set[str]:
    dsn = f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} user={SETTINGS.pg_user} dbname={SETTINGS.audit_database}"
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT DISTINCT site FROM audit.event WHERE source_id = %s AND step = %s", (source_id, step))
        return {row[0] for row in cursor.fetchall()}


def _leaves(items: list[dict[str, Any]]) -> list[str]:
    out = []
    for item in items:
        out += _leaves(item["item"]) if "item" in item else [item["linkId"]]
    return out


def test_central_decision_reaches_both_hospitals_with_their_local_patient_and_does_not_come_back(
    worker: Worker, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str
) -> None:
    shared = patient_at_both_hospitals(stack, site_a, site_b, f"Q{run_id}", f"{run_id}-bf")
    key, at_a, at_b, encounter_b = shared.key, shared.at_a, shared.at_b, shared.encounter_b

    created = stack.send(decision_response(f"Patient/{key}"))
    row_id = target_id("central", "QuestionnaireResponse", created["id"])
    for site, local in ((site_a, at_a["id"]), (site_b, at_b["id"])):
        content, version = wait_for(
            lambda s=site: _row(s, "QuestionnaireResponse", row_id), timeout=120, what=f"the decision at {local}"
        )
        assert content["subject"] == {"reference": f"Patient/{local}"}
        assert len(_leaves(content["item"])) == 20
        assert content["identifier"] == {
            "system": logical_system("central", "QuestionnaireResponse"),
            "value": created["id"],
        }
        assert {"system": ORIGIN_TAG_SYSTEM, "code": "central"} in content["meta"]["tag"]
        assert version == 1
    wait_for(  # the audit store takes it from the audit topic on its own time
        lambda: {row[0] for row in audit_rows(created["id"])} >= {"written_back"} or None,
        timeout=60,
        what="the decision's written_back audit row",
    )

    # The hospitals' capture of those rows passes identity resolution before a later change of the same
    # patient does (one partition per local patient): once these arrive, the decision was seen and not sent.
    later_a = observation_for(f"{run_id}-bf-a", at_a["id"], 1, 61.0)
    later_b = {
        **observation_for(f"{run_id}-bf-b", at_b["id"], 1, 61.5),
        "encounter": {"reference": f"Encounter/{encounter_b['id']}"},
    }
    site_a.upsert(later_a)
    site_b.upsert(later_b)
    for site_name, obs in (("site-a", later_a), ("site-b", later_b)):
        wait_for(
            lambda s=site_name, o=obs: stack.read("Observation", target_id(s, "Observation", o["id"])),
            timeout=120,
            what=f"{site_name}'s later observation",
        )
    wait_for(
        lambda: _sites_with_step(row_id, "echo_suppressed") == {"site-a", "site-b"},
        timeout=60,
        what="each hospital's capture of the decision audited as not sent back",
    )
    status, found = stack.get(f"QuestionnaireResponse?subject=Patient/{key}&_summary=count")
    assert status == 200 and found["total"] == 1, "the decision came back to central from a hospital"
    for site_name in ("site-a", "site-b"):
        assert stack.read("QuestionnaireResponse", target_id(site_name, "QuestionnaireResponse", row_id)) is None
    for site in (site_a, site_b):
        assert _row(site, "QuestionnaireResponse", row_id)[1] == 1, "written back more than once"


def test_a_decision_moved_to_another_patient_leaves_the_hospital_of_the_patient_it_named(
    worker: Worker, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str
) -> None:
    """The board wrote its decision about the wrong patient and corrects the subject: the copy leaves the
    hospital of the patient it named (which does not know the other one) and reaches the other's."""
    first = with_kvnr({"resourceType": "Patient", "id": f"{run_id}-subj-a", "gender": "male"}, f"SA{run_id}")
    second = with_kvnr({"resourceType": "Patient", "id": f"{run_id}-subj-b", "gender": "male"}, f"SB{run_id}")
    key_a, key_b = global_patient_key(KVNR_SYSTEM, f"SA{run_id}"), global_patient_key(KVNR_SYSTEM, f"SB{run_id}")
    encounter = encounter_for(f"{run_id}-subj", second["id"])
    site_a.upsert(first)
    site_b.upsert_many([second, encounter, tumorboard_flag(f"{run_id}-subj-tb", second["id"], encounter["id"])])
    for key in (key_a, key_b):
        wait_for(lambda k=key: stack.read("Patient", k), timeout=120, what=f"Patient/{key} at central")

    created = stack.send(decision_response(f"Patient/{key_a}"))
    row_id = target_id("central", "QuestionnaireResponse", created["id"])
    content, _ = wait_for(lambda: _row(site_a, "QuestionnaireResponse", row_id), timeout=120, what="site-a's copy")
    assert content["subject"] == {"reference": f"Patient/{first['id']}"}

    stack.send({**created, "subject": {"reference": f"Patient/{key_b}"}}, method="PUT")
    content, _ = wait_for(lambda: _row(site_b, "QuestionnaireResponse", row_id), timeout=120, what="site-b's copy")
    assert content["subject"] == {"reference": f"Patient/{second['id']}"}
    wait_for(
        lambda: _row(site_a, "QuestionnaireResponse", row_id) is None or None,
        timeout=120,
        what="site-a's copy withdrawn",
    )


def test_a_decision_for_a_patient_no_hospital_sent_is_a_dead_letter_with_the_reason(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A patient registered at central only (no hospital sent it): its decision has nowhere to flow back to.
    person = stack.send(with_kvnr({"resourceType": "Patient", "gender": "male"}, f"Z{run_id}"))
    created = stack.send(decision_response(f"Patient/{person['id']}"))
    row_id = target_id("central", "QuestionnaireResponse", created["id"])

    def letter() -> dict[str, Any] | None:
        assert cdrsync(["dlq", "list", "--json", "--stage", "backflow", "--since", "30m"]) == 0
        lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        return next((d for d in lines if f"QuestionnaireResponse/{created['id']}" in (d["reason"] or "")), None)

    found = wait_for(letter, timeout=120, what="the decision's dead letter")
    assert found["error_class"] == "no_hospital" and "no hospital sent this patient" in found["reason"]
    steps = wait_for(lambda: {row[0] for row in audit_rows(created["id"])}, timeout=60, what="its audit row")
    assert "dead_lettered" in steps and "written_back" not in steps
    assert _row(site_a, "QuestionnaireResponse", row_id) is None

    # Its deletion has nothing to do anywhere: counted, not another dead letter to review.
    counted = {"outcome": "no_hospital", "resource_type": "QuestionnaireResponse"}
    before = worker.metric("cdrsync_backflow_total", **counted)
    request = urllib.request.Request(f"{stack.base_url}/QuestionnaireResponse/{created['id']}", method="DELETE")
    with urllib.request.urlopen(request, timeout=30):
        pass
    wait_for(lambda: worker.metric("cdrsync_backflow_total", **counted) > before, timeout=120, what="the deletion")
    assert cdrsync(["dlq", "list", "--json", "--stage", "backflow", "--since", "30m"]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [d["id"] for d in lines if f"QuestionnaireResponse/{created['id']}" in (d["reason"] or "")] == [found["id"]]


@pytest.mark.parametrize("edit", ["its own resource", "the stored resource, changed"])
def test_the_board_s_edit_of_a_hospital_s_questionnaire_response_flows_back(
    worker: Worker, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str, edit: str
) -> None:
    """A QuestionnaireResponse site-a sent, then amended by the board at central, either with a resource of the
    application's own or as most clients update: read, changed, written back whole, meta.source included. HAPI
    keeps the site-a tag of cdrsync's write on the board's version, and in the second case cdrsync's source
    URI as well: the version's request id says it is central's, and it flows back; site-a's own form did not."""
    tag = "ed" if edit == "its own resource" else "rw"
    shared = patient_at_both_hospitals(stack, site_a, site_b, f"E{run_id}{tag}", f"{run_id}-{tag}")
    sent = {**decision_response(f"Patient/{shared.at_a['id']}"), "id": f"{run_id}-{tag}-qr", "status": "in-progress"}
    site_a.upsert(sent)
    at_central = central_id("QuestionnaireResponse", sent["id"])
    arrived = wait_for(lambda: stack.read("QuestionnaireResponse", at_central), timeout=120, what="site-a's form")
    assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-a"} in arrived["meta"]["tag"]
    assert arrived["meta"]["source"].startswith("urn:cdrsync:site:site-a#cdrsync-")  # its request id: cdrsync's

    if edit == "its own resource":
        amended = {**decision_response(f"Patient/{shared.key}"), "id": at_central, "status": "amended"}
    else:
        amended = {**arrived, "status": "amended"}
    stored = stack.send(amended, method="PUT")
    assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-a"} in stored["meta"]["tag"]  # kept by the server

    row_id = target_id("central", "QuestionnaireResponse", at_central)
    for site, local in ((site_a, shared.at_a["id"]), (site_b, shared.at_b["id"])):
        content, version = wait_for(
            lambda s=site: _row(s, "QuestionnaireResponse", row_id), timeout=120, what=f"the amended form at {local}"
        )
        assert content["status"] == "amended" and content["subject"] == {"reference": f"Patient/{local}"}
        assert version == 1, f"site-a's own form flowed back to {local} before the board's edit"


def test_a_hospital_version_a_reviewer_takes_over_the_board_s_edit_flows_back_to_every_hospital(
    worker: Worker,
    stack: Central,
    site_a: SiteDatabase,
    site_b: SiteDatabase,
    run_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """site-a sends a form, the board amends it at central (both hospitals get the board's version), then site-a
    changes its form too: a conflict. The reviewer takes site-a's version. Central now holds it, so both hospitals
    must too; kept as site-a's write, it would never flow back, and they would keep a decision central dropped. So
    must site-a's later changes of the form, which central takes without a conflict once the reviewer decided."""
    shared = patient_at_both_hospitals(stack, site_a, site_b, f"T{run_id}", f"{run_id}-ti")
    sent = {**decision_response(f"Patient/{shared.at_a['id']}"), "id": f"{run_id}-ti-qr", "status": "in-progress"}
    site_a.upsert(sent)
    at_central = central_id("QuestionnaireResponse", sent["id"])
    arrived = wait_for(lambda: stack.read("QuestionnaireResponse", at_central), timeout=120, what="site-a's form")
    stack.send({**arrived, "status": "amended"}, method="PUT")  # the board's edit
    row_id = target_id("central", "QuestionnaireResponse", at_central)
    for site in (site_a, site_b):
        wait_for(
            lambda s=site: _row_in_status(s, row_id, "amended"),
            timeout=120,
            what="the board's version at both hospitals",
        )

    site_a.upsert({**sent, "status": "completed"})  # site-a's own change, over the version the board replaced
    ref = f"QuestionnaireResponse/{at_central}"

    def open_conflict() -> str | None:
        assert cdrsync(["conflicts", "list", "--json"]) == 0
        lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        return next((line["id"] for line in lines if line["target_ref"] == ref), None)

    conflict_id = wait_for(open_conflict, timeout=120, what="the conflict with the board's edit")
    assert cdrsync(["conflicts", "resolve", conflict_id, "--take-incoming", "--reason", "tb", "--execute"]) == 0
    resolved = wait_for(
        lambda: (body := stack.read("QuestionnaireResponse", at_central)) and body["status"] == "completed" and body,
        timeout=120,
        what="site-a's version at central",
    )
    assert resolved["meta"]["source"].startswith("urn:cdrsync:site:central")  # central's decision now
    for site, local in ((site_a, shared.at_a["id"]), (site_b, shared.at_b["id"])):
        content, version = wait_for(
            lambda s=site: _row_in_status(s, row_id, "completed"),
            timeout=120,
            what=f"the reviewer's choice at {local}",
        )
        assert content["subject"] == {"reference": f"Patient/{local}"} and version == 2
    # site-a's next change is written over the decided version without a conflict: it flows back as well
    site_a.upsert({**sent, "status": "stopped"})
    for site in (site_a, site_b):
        wait_for(lambda s=site: _row_in_status(s, row_id, "stopped"), timeout=120, what="site-a's later change")
    status, found = stack.get(f"QuestionnaireResponse?subject=Patient/{shared.key}&_summary=count")
    assert status == 200 and found["total"] == 1, "a copy came back to central from a hospital"
