"""Central's capture tells cdrsync's own writes there from the board's edits by the request id HAPI keeps in
each version's meta.source (README: No echoes). Behind a gateway that drops X-Request-ID, cdrsync's writes
carry ids the server made, like an application's: the capture notices, judges by source URI alone so that
no hospital's form comes back as a decision, and alerts; once the ids arrive again, an edit that writes
meta.source back flows back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.ids import target_id
from tests.casebuilder import decision_response
from tests.faults.conftest import Central, SiteDatabase, wait_for, worker_behind
from tests.faults.proxy import FaultProxy
from tests.integration.conftest import central_id, patient_at_both_hospitals

pytestmark = pytest.mark.faults


def _row(site: SiteDatabase, row_id: str) -> tuple[dict[str, Any], int] | None:
    with site.conn.cursor() as cursor:
        cursor.execute(
            "SELECT content, version FROM fhir.resource WHERE resource_type = 'QuestionnaireResponse' AND id = %s",
            (row_id,),
        )
        row = cursor.fetchone()
    return (row[0], row[1]) if row else None


def test_without_request_ids_nothing_of_cdrsync_s_comes_back_and_edits_flow_once_they_return(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    proxy.dropped_headers = {"x-request-id"}
    with worker_behind(proxy, tmp_path) as worker:
        wait_for(
            lambda: worker.samples("cdrsync_capture_request_ids_kept", site="central") == [0.0],
            timeout=120,
            what="the capture noticing that the server gets no request ids of cdrsync's",
        )
        shared = patient_at_both_hospitals(stack, site_a, site_b, f"R{run_id}", f"{run_id}-ri")
        sent = {**decision_response(f"Patient/{shared.at_a['id']}"), "id": f"{run_id}-ri-qr", "status": "in-progress"}
        site_a.upsert(sent)
        at_central = central_id("QuestionnaireResponse", sent["id"])
        arrived = wait_for(lambda: stack.read("QuestionnaireResponse", at_central), timeout=120, what="site-a's form")
        source = arrived["meta"]["source"]
        assert source.startswith("urn:cdrsync:site:site-a#") and "#cdrsync-" not in source  # the id is HAPI's

        # A decision of the board's own, written after site-a's form, flows back: once it is at both
        # hospitals, the capture has judged site-a's form, which it must not have sent back.
        decision = stack.send(decision_response(f"Patient/{shared.key}"))
        for site in (site_a, site_b):
            wait_for(
                lambda s=site: _row(s, target_id("central", "QuestionnaireResponse", decision["id"])),
                timeout=120,
                what="the board's decision at both hospitals",
            )
        form_row = target_id("central", "QuestionnaireResponse", at_central)
        assert _row(site_a, form_row) is None and _row(site_b, form_row) is None, "site-a's own form came back"

        proxy.dropped_headers = set()
        wait_for(
            lambda: worker.samples("cdrsync_capture_request_ids_kept", site="central") == [1.0],
            timeout=60,
            what="the capture noticing the request ids again",
        )
        time.sleep(10)  # versions up to two polls and 5 s after that are still judged by URI (README: No echoes)
        stack.send({**arrived, "status": "amended"}, method="PUT")  # read, changed, written back whole
        for site, local in ((site_a, shared.at_a["id"]), (site_b, shared.at_b["id"])):
            content, version = wait_for(lambda s=site: _row(s, form_row), timeout=120, what=f"the edit at {local}")
            assert content["status"] == "amended" and content["subject"] == {"reference": f"Patient/{local}"}
            assert version == 1
