"""Write-back to a hospital that takes central's decisions at a FHIR endpoint (`writeback.method: fhir`).

Site-b is configured so (in a configuration root of the test's own), its endpoint a second HAPI server of the
stack's build (`compose/native/fhir.sh` with FHIR_NAME), reached through a fault proxy. The hospital's server
holds its own Patient; central's decision arrives there in the hospital's ids, its amendments follow, an
outage of the endpoint holds site-b's lane (site-a is served meanwhile) until it answers, and a deletion at
central deletes the hospital's copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.backflow import written_version
from pipeline.ids import target_id
from tests.casebuilder import decision_response
from tests.faults.conftest import (
    ROOT,
    Central,
    SiteDatabase,
    Worker,
    config_root_with,
    decision_row,
    wait_for,
    worker_with_config,
)
from tests.faults.proxy import FaultProxy
from tests.integration.conftest import patient_at_both_hospitals

pytestmark = pytest.mark.faults
HOLD_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hospital_fhir(tmp_path: Path) -> Iterator[Central]:
    """A FHIR server of the hospital's own: the stack's HAPI build, a second instance with an empty database."""
    port = _free_port()
    env = {
        **os.environ,
        "FHIR_NAME": "fhir-hospital",
        "FHIR_PORT": str(port),
        "FHIR_BASE_URL": f"http://localhost:{port}/fhir",
        "FHIR_DATA": str(tmp_path / "hospital-fhir"),
        "FHIR_JAVA_OPTS": "-Xms128m -Xmx1g",
    }
    script = ROOT / "compose" / "native" / "fhir.sh"
    try:
        subprocess.run(["bash", str(script), "start"], env=env, check=True, timeout=600)
        yield Central(env["FHIR_BASE_URL"])
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, check=False, timeout=120)


@pytest.fixture
def endpoint_proxy(hospital_fhir: Central) -> Iterator[FaultProxy]:
    proxy = FaultProxy(hospital_fhir.base_url)
    yield proxy
    proxy.close()


@pytest.fixture
def worker(stack: Central, endpoint_proxy: FaultProxy, tmp_path: Path) -> Iterator[Worker]:
    """Site-b's decisions go to its FHIR endpoint (through the proxy)."""
    root = config_root_with(
        tmp_path, "site-b", "  method: source-table\n", f"  method: fhir\n  fhir_base_url: {endpoint_proxy.base_url}\n"
    )
    with worker_with_config(root, tmp_path, CDRSYNC_WRITEBACK_HOLD_SECONDS=str(HOLD_SECONDS)) as process:
        yield process


_row = decision_row


def _delete(server: Central, resource_type: str, resource_id: str) -> None:
    request = urllib.request.Request(f"{server.base_url}/{resource_type}/{resource_id}", method="DELETE")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status in (200, 204)


def test_decisions_reach_a_hospital_s_fhir_endpoint_in_its_ids_held_through_its_outage(
    worker: Worker,
    hospital_fhir: Central,
    endpoint_proxy: FaultProxy,
    stack: Central,
    site_a: SiteDatabase,
    site_b: SiteDatabase,
    run_id: str,
) -> None:
    shared = patient_at_both_hospitals(stack, site_a, site_b, f"F{run_id}", f"{run_id}-fw")
    local_b = shared.at_b["id"]
    hospital_fhir.send(shared.at_b, method="PUT")  # the hospital's server holds its own patient

    decision = stack.send(decision_response(f"Patient/{shared.key}"))
    copy_id = target_id("central", "QuestionnaireResponse", decision["id"])

    def copy_at_b(status: str) -> dict[str, Any] | None:
        found = hospital_fhir.read("QuestionnaireResponse", copy_id)
        return found if found is not None and found["status"] == status else None

    copy = wait_for(lambda: copy_at_b("completed"), timeout=120, what="the decision at site-b's FHIR endpoint")
    assert copy["subject"] == {"reference": f"Patient/{local_b}"}
    assert written_version(copy) == 1
    assert _row(site_b, copy_id) is None  # not in site-b's table: its decisions go to the endpoint
    assert wait_for(lambda: _row(site_a, copy_id), timeout=60, what="the decision in site-a's table")

    stack.send({**decision, "status": "amended"}, method="PUT")
    copy = wait_for(lambda: copy_at_b("amended"), timeout=120, what="the amendment at site-b's endpoint")
    assert written_version(copy) == 2

    # The endpoint goes away: site-b's lane holds (no dead letter), site-a is served, and once it answers
    # the held version is written.
    endpoint_proxy.down()
    stack.send({**decision, "status": "entered-in-error"}, method="PUT")
    wait_for(
        lambda: (_row(site_a, copy_id) or {}).get("status") == "entered-in-error" or None,
        timeout=120,
        what="the third version in site-a's table while site-b's endpoint is away",
    )
    wait_for(
        lambda: worker.metric("cdrsync_target_breaker_open", target="site-b") == 1,
        timeout=90,
        what="site-b's breaker to open",
    )
    assert worker.metric("cdrsync_writeback_waiting", target="site-b") >= 1
    endpoint_proxy.up()
    copy = wait_for(lambda: copy_at_b("entered-in-error"), timeout=120, what="the held version at site-b")
    assert written_version(copy) == 3
    wait_for(lambda: worker.metric("cdrsync_target_breaker_open", target="site-b") == 0, timeout=60, what="closing")

    _delete(stack, "QuestionnaireResponse", decision["id"])
    wait_for(
        lambda: hospital_fhir.read("QuestionnaireResponse", copy_id) is None or None,
        timeout=120,
        what="the deletion at site-b's endpoint",
    )
    wait_for(lambda: _row(site_a, copy_id) is None or None, timeout=60, what="the deletion in site-a's table")
    versions = hospital_fhir.history("QuestionnaireResponse", copy_id)
    assert [v["status"] if v else None for v in versions] == ["completed", "amended", "entered-in-error", None]
