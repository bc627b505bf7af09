"""`cdrsync demo load` and `demo wait` on a stack that other work already used.

The demo must not depend on empty databases: a hospital integration team tries it on the stack its tests ran
on. Rows it did not write (here: a patient whose insurance number changed, held for an identity review that
nobody decides, so it never reaches central) are not the demo's to wait for.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from pipeline.config import Config
from pipeline.demo import demo_fhir_keys
from pipeline.demo_summary import demo_expected
from pipeline.identity import global_patient_key
from tests.casebuilder import KVNR_SYSTEM, with_kvnr
from tests.integration.conftest import ROOT, SETTINGS, Central, SiteDatabase, Worker, wait_for

pytestmark = pytest.mark.integration


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_the_demo_waits_for_its_own_rows_only_and_finishes_on_a_used_stack(
    worker: Worker, stack: Central, site_a: SiteDatabase, config: Config, run_id: str
) -> None:
    # Left over by other work: a patient that reached central, then changed its insurance number. The change is
    # held for a review, so central never gets a Patient under the new number.
    patient = {"resourceType": "Patient", "id": f"{run_id}-leftover", "gender": "female"}
    first, second = f"L{run_id}-1", f"L{run_id}-2"
    site_a.upsert(with_kvnr(patient, first))
    wait_for(
        lambda: stack.read("Patient", global_patient_key(KVNR_SYSTEM, first)),
        timeout=120,
        what="the leftover patient at central",
    )
    site_a.upsert(with_kvnr(patient, second))
    held = f"Patient/{global_patient_key(KVNR_SYSTEM, second)}"

    loaded = _cli("demo", "load", timeout=120)
    assert loaded.returncode == 0, loaded.stderr

    by_site, _ = demo_expected(SETTINGS, config)
    assert all(held not in refs for refs in by_site.values())
    fhir_keys = demo_fhir_keys(lambda name: config.sites[name].resource_types)
    # Every demo row of site-a is expected (its route sends everything), under the ids central gives them.
    assert len(by_site["site-a"]) == len(fhir_keys["site-a"])
    assert by_site["site-c"] and by_site["site-d"], "the adapter hospitals' demo rows are expected too"

    waited = _cli("demo", "wait", "--timeout", "300", timeout=400)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    progress = re.findall(r"central CDR has (\d+)/(\d+) source resources, (\d+) dead-lettered", waited.stdout)
    assert progress, waited.stdout
    arrived, total, dead = map(int, progress[-1])  # a line each time the figures changed: the last is the end
    assert arrived + dead == total
    # The one dead letter is FHIR-Converter's VXU DocumentReference without its required content.
    assert dead == 1 and "DocumentReference" in waited.stdout
    assert total == len(set().union(*by_site.values())), "a person several hospitals treat is one central Patient"
    assert stack.read("Patient", held.removeprefix("Patient/")) is None, "the leftover stays held"
