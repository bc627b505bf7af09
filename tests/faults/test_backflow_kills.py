"""SIGKILL the worker while the tumour board keeps deciding: central's capture (the leader's `_history` poll,
pipeline/capture.py) moves its cursor only after Kafka acknowledged the events, and write-back commits only
after the hospital has the row, so every decision reaches both hospitals, once, whatever a kill interrupts."""

from __future__ import annotations

import random
import threading
import time

import pytest

from pipeline.references import logical_system
from tests.casebuilder import decision_response
from tests.faults.conftest import SOAK, Central, SiteDatabase, Worker, wait_for
from tests.integration.conftest import patient_at_both_hospitals

pytestmark = pytest.mark.faults
DECISIONS = 30 if SOAK else 12
KILLS = 8 if SOAK else 4


def _rows(site: SiteDatabase, central_ids: list[str]) -> dict[str, int]:
    """Row version per written-back decision (by the central id each row keeps as identifier)."""
    with site.conn.cursor() as cursor:
        cursor.execute(
            "SELECT content->'identifier'->>'value', version FROM fhir.resource "
            "WHERE resource_type = 'QuestionnaireResponse' AND content->'identifier'->>'system' = %s "
            "AND content->'identifier'->>'value' = ANY(%s)",
            (logical_system("central", "QuestionnaireResponse"), central_ids),
        )
        found: dict[str, int] = {}
        for value, version in cursor.fetchall():
            assert value not in found, f"decision {value} written back twice under different ids"
            found[value] = version
        return found


def test_decisions_survive_sigkills_of_the_capturing_worker(
    fault_worker: Worker, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str
) -> None:
    fault_worker.start()
    key = patient_at_both_hospitals(stack, site_a, site_b, f"K{run_id}", f"{run_id}-bk").key

    rng = random.Random(23)
    created: list[str] = []

    def decide() -> None:
        for _ in range(DECISIONS):
            created.append(stack.send(decision_response(f"Patient/{key}"))["id"])
            time.sleep(rng.uniform(1.0, 4.0))  # spread over the kills

    board = threading.Thread(target=decide, daemon=True)
    board.start()
    for _ in range(KILLS):
        time.sleep(rng.uniform(1.0, 4.0))  # capture polls every 2 s: some kills land between a send and its cursor
        fault_worker.kill()
        fault_worker.start()
    board.join(timeout=180)
    assert len(created) == DECISIONS

    def all_rows(site: SiteDatabase) -> dict[str, int] | None:
        rows = _rows(site, created)
        return rows if len(rows) == DECISIONS else None

    for name, site in (("site-a", site_a), ("site-b", site_b)):
        rows = wait_for(
            lambda s=site: all_rows(s),
            timeout=300,
            what=f"all {DECISIONS} decisions at {name}",
        )
        assert set(rows) == set(created)
        rewritten = {value: version for value, version in rows.items() if version != 1}
        assert not rewritten, f"rows rewritten after their first write: {rewritten}"
    system = logical_system("central", "QuestionnaireResponse")
    for central in created:  # nothing came back to central as a new decision
        status, found = stack.get(f"QuestionnaireResponse?identifier={system}|{central}&_summary=count")
        assert status == 200 and found is not None and found["total"] == 0
    print(
        f"\nBACKFLOW KILLS decisions={DECISIONS} kills={KILLS} restarts={fault_worker.restarts}: none lost, none twice"
    )
