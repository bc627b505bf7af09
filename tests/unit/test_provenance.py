"""Provenance: one per central resource and contributing site, written once, removed with its resource."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
from fhir.resources.R4B import get_fhir_model_class

from pipeline.provenance import add_provenance, provenance_for, provenance_id, runs_alongside
from pipeline.records import RoutedResource
from pipeline.references import logical_system
from tests.casebuilder import routed_record

pytestmark = pytest.mark.unit


def rec(ref: str, site: str = "site-a", op: str = "CREATE") -> RoutedResource:
    resource_type, target_id = ref.split("/")
    return routed_record(
        {},
        site=site,
        resource_type=resource_type,
        source_id=f"local-{target_id}",
        target_id=target_id,
        patient_key="k",
        op=op,
        source_version=None,
        content_hash=None,
        source_commit_ms=1_700_000_000_000,
    )


def test_provenance_points_at_the_central_resource_and_its_source_site_and_id() -> None:
    provenance = provenance_for(rec("Observation/o1"), "Hospital A")
    body = orjson.loads(provenance.resource or "")
    get_fhir_model_class("Provenance").model_validate(body)
    assert body["target"] == [{"reference": "Observation/o1"}]
    assert body["entity"][0]["what"]["identifier"] == {
        "system": logical_system("site-a", "Observation"),
        "value": "local-o1",
    }
    assert body["agent"][0]["who"]["identifier"] == {"system": "urn:cdrsync:site", "value": "site-a"}
    assert provenance.target_ref == f"Provenance/{provenance_id('site-a', 'Observation/o1')}"
    assert provenance.dependencies == ["Observation/o1"]
    assert provenance_for(rec("Observation/o1")).target_id == provenance.target_id  # deterministic


def test_only_a_first_release_gets_a_provenance_so_new_versions_cost_no_extra_write() -> None:
    first = add_provenance([rec("Observation/o1"), rec("Observation/o1")], {}, {}, ["site-a"])
    assert [r.resource_type for r in first] == ["Observation", "Observation", "Provenance"]
    again = add_provenance([rec("Observation/o1")], {"Observation/o1": {}}, {}, ["site-a"])
    assert [r.resource_type for r in again] == ["Observation"]


def test_a_second_hospital_joining_a_patient_gets_its_own_provenance() -> None:
    patients = {"k": {"sites": ["site-a"], "versions": {}}}
    released = {"Patient/k": {}}
    from_b = add_provenance([rec("Patient/k", site="site-b")], released, patients, ["site-a", "site-b"])
    assert [r.target_id for r in from_b[1:]] == [provenance_id("site-b", "Patient/k")]
    from_a = add_provenance([rec("Patient/k")], released, patients, ["site-a", "site-b"])
    assert len(from_a) == 1


def test_deletes_take_their_provenance_along_every_site_for_a_patient() -> None:
    [observation] = add_provenance([rec("Observation/o1", op="DELETE")], {}, {}, ["site-a", "site-b"])
    assert observation.delete_with == [f"Provenance/{provenance_id('site-a', 'Observation/o1')}"]
    cycle = replace(rec("Encounter/e1", op="DELETE"), delete_with=["Condition/c1"])
    [encounter] = add_provenance([cycle], {}, {}, ["site-a"])
    assert encounter.delete_with[0] == "Condition/c1" and len(encounter.delete_with) == 3
    [patient] = add_provenance([rec("Patient/k", op="DELETE")], {}, {}, ["site-a", "site-b"])
    assert sorted(patient.delete_with) == sorted(
        f"Provenance/{provenance_id(site, 'Patient/k')}" for site in ("site-a", "site-b")
    )


def test_only_a_provenance_upsert_is_written_alongside_a_patients_other_records() -> None:
    observation = rec("Observation/o0")
    provenance = provenance_for(observation)
    assert runs_alongside(provenance)
    assert not runs_alongside(observation)  # the patient's own records keep their order
    assert not runs_alongside(replace(provenance, op="DELETE", resource=None))
