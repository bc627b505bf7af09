"""The demo's expectations on a triggered route come from the worker's own routing and trigger code."""

from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.demo import DEMO_ASSIGNMENT, FIXTURES, SourceRow, bundle_rows, demo_flags, expected_targets
from pipeline.ids import target_id
from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def _site_b_rows(with_flags: bool) -> list[SourceRow]:
    site = load_config(ROOT).sites["site-b"]
    rows = [
        r for bundle in DEMO_ASSIGNMENT["site-b"] for r in bundle_rows(FIXTURES / f"{bundle}.json", site.resource_types)
    ]
    rows += demo_flags("site-b") if with_flags else []
    return [(r.resource_type, r.id, float(n), r.content) for n, r in enumerate(rows)]


def test_nothing_is_expected_from_a_tumorboard_site_without_flags() -> None:
    site = load_config(ROOT).sites["site-b"]
    assert expected_targets(site, _site_b_rows(with_flags=False)) == ({}, 0)


def test_flagged_encounters_and_their_patients_are_expected_unflagged_patients_are_not() -> None:
    site = load_config(ROOT).sites["site-b"]
    expected, _ = expected_targets(site, _site_b_rows(with_flags=True))
    flags = demo_flags("site-b")
    flagged = {str(f.content["encounter"]["reference"]) for f in flags if "encounter" in f.content}
    for encounter in flagged:
        assert f"Encounter/{target_id('site-b', 'Encounter', encounter.split('/')[1])}" in expected
    lab_patient = bundle_rows(FIXTURES / "LAB-ORU-1.json", ["Observation"])[0].id  # LAB-ORU-1 is not flagged
    assert f"Observation/{target_id('site-b', 'Observation', lab_patient)}" not in expected
    assert {ref.split("/")[0] for ref in expected} >= {"Patient", "Encounter", "Flag"}
