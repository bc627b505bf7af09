"""openEHR → FHIR mapping rules on small variants of the shared examples (one test per edge case)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import orjson
import pytest

from pipeline.adapters.openehr import CompositionSource, composition_to_resources
from pipeline.adapters.openehr.rm import fhir_datetime, quantity
from pipeline.errors import MappingError
from pipeline.resources import validate_resource
from tests.golden.openehr_cases import COMPOSITIONS, IDENTIFIER_SYSTEMS, TZ, source_for

pytestmark = pytest.mark.unit


def _load(name: str) -> dict:
    return orjson.loads((COMPOSITIONS / f"{name}.json").read_bytes())


def _map(composition: dict, source: CompositionSource | None = None):
    return composition_to_resources(composition, source or source_for("case"), TZ, IDENTIFIER_SYSTEMS)


def _first(composition: dict, archetype: str) -> dict:
    def walk(node):
        if isinstance(node, dict):
            if node.get("archetype_node_id") == archetype:
                return node
            node = list(node.values())
        if isinstance(node, list):
            for item in node:
                found = walk(item)
                if found is not None:
                    return found
        return None

    found = walk(composition)
    assert found is not None, archetype
    return found


def test_ids_are_stable_across_versions_and_distinct_across_compositions() -> None:
    lab = _load("laboratory_report")
    v1 = _map(lab, source_for("x"))
    v2 = _map(lab, CompositionSource("golden-x", "site-b.example", 2, "e", "s", "kvid-10"))
    other = _map(lab, source_for("y"))
    assert [r["id"] for r in v1.resources] == [r["id"] for r in v2.resources]
    assert not {r["id"] for r in v1.resources} & {r["id"] for r in other.resources}
    versions = {
        i["value"] for r in v2.resources for i in r["identifier"] if i["system"].endswith("composition-version")
    }
    assert versions == {"golden-x::site-b.example::2"}


def test_unknown_archetype_is_reported_with_its_path_not_dropped() -> None:
    mapped = _map(_load("minimal_observation"))
    assert [(u.archetype_id, u.path) for u in mapped.unmapped] == [
        (
            "openEHR-EHR-OBSERVATION.minimal.v1",
            "/content[openEHR-EHR-OBSERVATION.minimal.v1 and name/value='Minimal',0]",
        )
    ]


def test_entry_paths_count_per_archetype_so_other_entries_do_not_renumber() -> None:
    ips = _load("ips_canonical")
    before = {r["id"] for r in _map(ips).resources}
    sections = ips["content"]
    other = {"_type": "SECTION", "archetype_node_id": "openEHR-EHR-SECTION.other.v1", "items": []}
    sections.insert(0, other)
    assert {r["id"] for r in _map(ips).resources} == before


def test_blood_pressure_becomes_a_panel_with_systolic_and_diastolic_components() -> None:
    observations = [r for r in _map(_load("ips_canonical")).resources if r["resourceType"] == "Observation"]
    observation = next(r for r in observations if r["code"].get("coding", [{}])[0].get("code") == "85354-9")
    components = {c["code"]["coding"][0]["code"]: c["valueQuantity"] for c in observation["component"]}
    assert components["8480-6"] == {
        "value": 266.0,
        "unit": "mm[Hg]",
        "system": "http://unitsofmeasure.org",
        "code": "mm[Hg]",
    }
    assert components["8462-4"]["value"] == 756.0
    assert observation["category"][0]["coding"][0]["code"] == "vital-signs"


def test_degree_celsius_gets_the_ucum_code_and_an_unknown_unit_none() -> None:
    assert quantity(37.2, "°C") == {"value": 37.2, "unit": "°C", "system": "http://unitsofmeasure.org", "code": "Cel"}
    assert quantity(32.3, "ct") == {"value": 32.3, "unit": "ct"}


def test_times_without_offset_take_the_site_zone_and_a_decimal_comma_is_read() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert fhir_datetime("2014-02-05T12:54:54", berlin) == "2014-02-05T12:54:54+01:00"
    assert fhir_datetime("2019-01-28T21:22:19,979+00:00", berlin) == "2019-01-28T21:22:19.979000+00:00"
    assert fhir_datetime("2021-10", berlin) == "2021-10"
    with pytest.raises(MappingError, match="not an ISO 8601"):
        fhir_datetime("yesterday", berlin)


def test_lab_result_keeps_reference_range_and_interpretation() -> None:
    observation = next(r for r in _map(_load("laboratory_report")).resources if r["resourceType"] == "Observation")
    assert observation["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2093-3",
        "display": "S-Cholesterol",
    }
    assert observation["valueQuantity"]["value"] == 203
    assert observation["referenceRange"] == [
        {"high": {"value": 200, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}}
    ]
    assert observation["interpretation"][0]["coding"][0]["code"] == "H"
    assert observation["status"] == "final"


def test_unknown_analyte_status_code_is_a_mapping_error_not_a_guess() -> None:
    gecco = _load("gecco_laborbefund")
    analyte = _first(gecco, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1")
    status = next(i for i in analyte["items"] if i.get("archetype_node_id") == "at0005")
    status["value"]["defining_code"]["code_string"] = "at9999"
    with pytest.raises(MappingError, match="unknown result status at9999"):
        _map(gecco)


def test_procedure_status_follows_the_ism_transition() -> None:
    ips = _load("ips_canonical")
    action = _first(ips, "openEHR-EHR-ACTION.procedure.v1")
    assert next(r for r in _map(ips).resources if r["resourceType"] == "Procedure")["status"] == "preparation"
    action["ism_transition"]["current_state"]["defining_code"]["code_string"] = "532"
    procedure = next(r for r in _map(ips).resources if r["resourceType"] == "Procedure")
    assert procedure["status"] == "completed"
    assert procedure["performedDateTime"] == "2021-12-03T16:05:19.514267+01:00"


def test_condition_without_qualifier_has_no_invented_clinical_status() -> None:
    ips = _load("ips_canonical")
    problem = _first(ips, "openEHR-EHR-EVALUATION.problem_diagnosis.v1")
    problem["data"]["items"] = [
        i for i in problem["data"]["items"] if i.get("archetype_node_id") != "openEHR-EHR-CLUSTER.problem_qualifier.v1"
    ]
    condition = next(r for r in _map(ips).resources if r["resourceType"] == "Condition")
    assert "clinicalStatus" not in condition
    assert condition["verificationStatus"]["coding"][0]["code"] == "provisional"


def test_patient_identifier_system_comes_from_the_site_file() -> None:
    mapped = _map(_load("demo_vitals_352"))
    assert mapped.patient["identifier"][0] == {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "A123456789"}
    unknown = composition_to_resources(_load("demo_vitals_352"), source_for("v"), TZ, {})
    assert unknown.patient["identifier"][0]["system"] == "urn:cdrsync:namespace:kvid-10"


def test_not_a_composition_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="not a COMPOSITION"):
        _map({"_type": "EHR_STATUS"})


def _tnm_cluster(archetype: str, suffix: str = "") -> dict:
    def element(node: str, text: str) -> dict:
        return {
            "_type": "ELEMENT",
            "name": {"_type": "DV_TEXT", "value": node},
            "archetype_node_id": node + suffix,
            "value": {"_type": "DV_TEXT", "value": text},
        }

    return {
        "_type": "CLUSTER",
        "name": {"_type": "DV_TEXT", "value": "TNM"},
        "archetype_node_id": archetype,
        "items": [element("at0003", "T2"), element("at0004", "N0"), element("at0005", "M0"), element("at0031", "IIA")],
    }


@pytest.mark.parametrize(
    ("archetype", "suffix", "codes"),
    [
        ("openEHR-EHR-CLUSTER.tnm.v1", "", ["21905-5", "21906-3", "21907-1", "21908-9"]),
        ("openEHR-EHR-CLUSTER.tnm-pathological.v1", ".1", ["21899-0", "21900-6", "21901-4", "21902-2"]),
    ],
)
def test_tnm_staging_cluster_becomes_condition_stage_and_observations(archetype, suffix, codes) -> None:
    ips = _load("ips_canonical")
    problem = _first(ips, "openEHR-EHR-EVALUATION.problem_diagnosis.v1")
    problem["data"]["items"].append(_tnm_cluster(archetype, suffix))
    resources = _map(ips).resources
    condition = next(r for r in resources if r["resourceType"] == "Condition")
    (stage,) = condition["stage"]
    assert stage["summary"] == {"text": "IIA"} and stage["type"]["coding"][0]["code"] == codes[3]
    staging = {
        r["code"]["coding"][0]["code"]: r
        for r in resources
        if r["resourceType"] == "Observation" and r["code"].get("coding", [{}])[0].get("code") in codes
    }
    assert sorted(staging) == sorted(codes)
    assert [staging[c]["valueCodeableConcept"]["text"] for c in codes] == ["T2", "N0", "M0", "IIA"]
    group = staging[codes[3]]
    assert stage["assessment"] == [{"reference": f"Observation/{group['id']}"}]
    assert group["hasMember"] == [{"reference": f"Observation/{staging[c]['id']}"} for c in codes[:3]]
    for resource in [condition, *staging.values()]:
        validate_resource(resource)
