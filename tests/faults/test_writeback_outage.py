"""A hospital's database goes away while the tumour board's decisions flow back to it.

Site-a's write-back reaches its database through a TCP proxy (`writeback.host/port` in a configuration root of
the test's own); the proxy going down is the database going away: new connections refused, open ones cut.

* A short outage: the decision is held for the hospital (its circuit breaker open, the TargetUnreachable
  gauge on, its write-back lane not empty), not dead-lettered, and written once the database is back; the
  other hospital gets its copy meanwhile, whichever of the two copies comes first in the patient's partition.
* An outage past CDRSYNC_WRITEBACK_HOLD_SECONDS: the other hospital gets its copy at once, the held decision
  goes to the dead letters with the reason, a later version for the hospital goes to the dead letters at once, and
  when the database is back the breaker closes by itself. Replayed newest first, the older version does not
  replace the newer one in the hospital's table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from pipeline.ids import target_id
from tests.casebuilder import decision_response
from tests.faults.conftest import (
    SETTINGS,
    Central,
    SiteDatabase,
    Worker,
    cdrsync,
    config_root_with,
    decision_row,
    wait_for,
    worker_with_config,
)
from tests.faults.proxy import TcpProxy
from tests.integration.conftest import patient_at_both_hospitals

pytestmark = pytest.mark.faults
HOLD_SECONDS = 20


@pytest.fixture
def database_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(SETTINGS.pg_host, SETTINGS.pg_port)
    yield proxy
    proxy.close()


@pytest.fixture
def worker(stack: Central, database_proxy: TcpProxy, tmp_path: Path) -> Iterator[Worker]:
    """Site-a's write-back reaches its database through the proxy."""
    root = config_root_with(
        tmp_path,
        "site-a",
        "  method: source-table\n",
        f"  method: source-table\n  host: 127.0.0.1\n  port: {database_proxy.port}\n",
    )
    with worker_with_config(root, tmp_path, CDRSYNC_WRITEBACK_HOLD_SECONDS=str(HOLD_SECONDS)) as process:
        yield process


_row = decision_row


def _letters(row_id: str) -> list[dict[str, Any]]:
    """Open write-back dead letters of this decision for site-a, oldest first."""
    lines = cdrsync("dlq", "list", "--json", "--stage", "writeback", "--target", "site-a").splitlines()
    letters = [orjson.loads(line) for line in lines if line.strip()]
    assert all(d["target"] == "site-a" for d in letters)
    mine = [d for d in letters if d["target_ref"] == f"QuestionnaireResponse/{row_id}"]
    return sorted(mine, key=lambda d: d["failed_at"])


def test_a_hospital_database_outage_holds_its_decisions_then_dead_letters_them_past_the_limit(
    worker: Worker,
    database_proxy: TcpProxy,
    stack: Central,
    site_a: SiteDatabase,
    site_b: SiteDatabase,
    run_id: str,
) -> None:
    key = patient_at_both_hospitals(stack, site_a, site_b, f"W{run_id}", f"{run_id}-wb").key

    def breaker_open() -> float:
        return worker.metric("cdrsync_target_breaker_open", target="site-a")

    # 1. A short outage: held, not dead-lettered, written when the database is back.
    database_proxy.down()
    first = stack.send(decision_response(f"Patient/{key}"))
    first_row = target_id("central", "QuestionnaireResponse", first["id"])
    wait_for(lambda: breaker_open() == 1, timeout=90, what="site-a's breaker to open")
    wait_for(lambda: _row(site_b, first_row), timeout=60, what="the decision at site-b while site-a is held")
    assert worker.metric("cdrsync_writeback_waiting", target="site-a") >= 1
    assert _row(site_a, first_row) is None
    database_proxy.up()
    content = wait_for(lambda: _row(site_a, first_row), timeout=90, what="the held decision at site-a")
    assert content["subject"] == {"reference": f"Patient/{run_id}-wb-a"}
    wait_for(lambda: worker.metric("cdrsync_writeback_waiting", target="site-a") == 0, timeout=30, what="an empty lane")
    wait_for(lambda: breaker_open() == 0, timeout=30, what="site-a's breaker to close")
    assert _letters(first_row) == []

    # 2. Past the hold limit: dead letters, site-b served, site-a's later version dead-lettered at once.
    database_proxy.down()
    second = stack.send(decision_response(f"Patient/{key}"))
    second_row = target_id("central", "QuestionnaireResponse", second["id"])
    wait_for(lambda: _row(site_b, second_row), timeout=60, what="site-b's copy while site-a's is held")
    letters = wait_for(
        lambda: _letters(second_row) or None, timeout=HOLD_SECONDS + 90, what="the held decision's dead letter"
    )
    assert letters[0]["error_class"] == "target_unavailable" and "site-a unreachable, held 20 s" in letters[0]["reason"]
    amended = stack.send({**second, "status": "amended"}, method="PUT")
    assert amended["meta"]["versionId"] == "2"
    both = wait_for(
        lambda: _letters(second_row) if len(_letters(second_row)) == 2 else None,
        timeout=90,
        what="version 2's dead letter",
    )
    assert "still unreachable" in both[1]["reason"]
    wait_for(
        lambda: (_row(site_b, second_row) or {}).get("status") == "amended", timeout=60, what="version 2 at site-b"
    )
    assert breaker_open() == 1  # the alert stays on while the hospital does not answer
    assert _row(site_a, second_row) is None

    database_proxy.up()
    wait_for(lambda: breaker_open() == 0, timeout=90, what="site-a's breaker to close on its own")
    older, newer = both
    assert "1 dead letters replayed" in cdrsync("dlq", "replay", newer["id"], "--execute")
    wait_for(
        lambda: (_row(site_a, second_row) or {}).get("status") == "amended", timeout=60, what="version 2 at site-a"
    )
    assert "1 dead letters replayed" in cdrsync("dlq", "replay", older["id"], "--execute")

    def audited_superseded() -> bool:
        dsn = (
            f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} user={SETTINGS.pg_user} dbname={SETTINGS.audit_database}"
        )
        with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT detail FROM audit.event WHERE target_id = %s AND step = 'written_back' AND target = 'site-a'",
                (second_row,),
            )
            # central holds version 2: version 1 is not written (had it been, site-a's row would refuse it too)
            return any("superseded (version 2 at central)" in (row[0] or "") for row in cursor.fetchall())

    wait_for(audited_superseded, timeout=60, what="the replayed version 1 audited as superseded at site-a")
    assert (_row(site_a, second_row) or {}).get("status") == "amended", "version 1 replaced version 2"
    assert _letters(second_row) == []  # both replayed: resolved
