"""openEHR → FHIR mapping rules on small variants of the shared examples (one test per edge case)."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import orjson
import pytest

from pipeline.adapters.openehr import CompositionSource, composition_to_resources, resource_to_composition
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
            "/content[openEHR-EHR-OBSERVATION.minimal.v1,0]",
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


# --- review fixes: each edge case once ------------------------------------------------------------


def _coded(code: str, text: str, terminology: str = "local") -> dict:
    phrase = {"_type": "CODE_PHRASE", "terminology_id": {"_type": "TERMINOLOGY_ID", "value": terminology}}
    return {"_type": "DV_CODED_TEXT", "value": text, "defining_code": phrase | {"code_string": code}}


def _item(node: dict, at_code: str) -> dict:
    return next(i for i in node["items"] if i.get("archetype_node_id") == at_code)


def _cholesterol() -> tuple[dict, dict]:
    """The laboratory report and its analyte's DV_QUANTITY (203 mg/dL, normal status H)."""
    lab = _load("laboratory_report")
    group = _first(lab, "at0096")
    return lab, _item(group, "at0112")["value"]


def _lab_observation(composition: dict) -> dict:
    return next(r for r in _map(composition).resources if r["resourceType"] == "Observation")


@pytest.mark.parametrize("sign", ["<", "<=", ">=", ">"])
def test_a_quantity_below_or_above_a_limit_keeps_its_comparator(sign) -> None:
    lab, quantity = _cholesterol()
    quantity["magnitude_status"] = sign
    observation = _lab_observation(lab)
    assert observation["valueQuantity"]["comparator"] == sign and observation["valueQuantity"]["value"] == 203
    validate_resource(observation)


def test_a_point_quantity_has_no_comparator() -> None:
    lab, quantity = _cholesterol()
    quantity["magnitude_status"] = "="
    assert "comparator" not in _lab_observation(lab)["valueQuantity"]


def test_an_approximate_quantity_is_a_mapping_error_not_an_exact_value() -> None:
    lab, quantity = _cholesterol()
    quantity["magnitude_status"] = "~"
    with pytest.raises(MappingError, match="approximate") as error:
        _map(lab)
    assert "203" not in str(error.value)


def _with_overall_status(code: str) -> dict:
    gecco = _load("gecco_laborbefund")
    data = _first(gecco, "openEHR-EHR-OBSERVATION.laboratory_test_result.v1")["data"]["events"][0]["data"]
    data["items"].append(
        {
            "_type": "ELEMENT",
            "name": {"_type": "DV_TEXT", "value": "Gesamtstatus"},
            "archetype_node_id": "at0073",
            "value": _coded(code, "Status"),
        }
    )
    analyte = _first(gecco, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1")
    analyte["items"] = [i for i in analyte["items"] if i.get("archetype_node_id") != "at0005"]  # status of its own
    return gecco


@pytest.mark.parametrize(
    ("code", "status"), [("at0115", "corrected"), ("at0116", "entered-in-error"), ("at0074", "cancelled")]
)
def test_a_corrected_withdrawn_or_cancelled_report_reaches_the_centre(code, status) -> None:
    resources = _map(_with_overall_status(code)).resources
    report = next(r for r in resources if r["resourceType"] == "DiagnosticReport")
    observation = next(r for r in resources if r["resourceType"] == "Observation")
    assert (report["status"], observation["status"]) == (status, status)
    for resource in (report, observation):
        validate_resource(resource)


def test_an_analyte_result_withdrawn_after_release_is_entered_in_error_not_cancelled() -> None:
    gecco = _load("gecco_laborbefund")
    status = _item(_first(gecco, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"), "at0005")
    status["value"] = _coded("at0022", "Endbefund, widerrufen")  # the template's text; en: 'Entered in error'
    assert _lab_observation(gecco)["status"] == "entered-in-error"


def test_a_withdrawn_report_withdraws_its_analytes_whatever_their_own_status() -> None:
    gecco = _with_overall_status("at0116")
    analyte = _first(gecco, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1")
    analyte["items"].append(
        {
            "_type": "ELEMENT",
            "name": {"_type": "DV_TEXT", "value": "Ergebnis-Status"},
            "archetype_node_id": "at0005",
            "value": _coded("at0018", "Endbefund"),
        }
    )
    assert _lab_observation(gecco)["status"] == "entered-in-error"


@pytest.mark.parametrize(
    ("normal_status", "interpretation"),
    [("HHH", "HH"), ("HH", "HH"), ("H", "H"), ("N", "N"), ("L", "L"), ("LL", "LL"), ("LLL", "LL")],
)
def test_normal_status_never_ranks_a_panic_value_below_an_alarm_value(normal_status, interpretation) -> None:
    lab, quantity = _cholesterol()
    quantity["normal_status"]["code_string"] = normal_status
    assert _lab_observation(lab)["interpretation"][0]["coding"][0]["code"] == interpretation


def test_an_interval_event_is_a_problem_not_a_spot_reading() -> None:
    ips = _load("ips_canonical")
    event = _first(ips, "openEHR-EHR-OBSERVATION.blood_pressure.v2")["data"]["events"][0]
    point = next(r for r in _map(ips).resources if r.get("code", {}).get("coding", [{}])[0].get("code") == "85354-9")
    assert point["effectiveDateTime"] == "2021-12-03T17:34:06.849379+01:00"  # a point event maps as ever
    event.update(
        _type="INTERVAL_EVENT",
        width={"_type": "DV_DURATION", "value": "PT24H"},
        math_function=_coded("144", "maximum", "openehr"),
    )
    with pytest.raises(MappingError, match=r"INTERVAL_EVENT \(math function openehr::144\)"):
        _map(ips)


def test_a_mapping_error_names_the_entry_by_archetype_and_position_not_by_its_name() -> None:
    gecco = _load("gecco_laborbefund")
    lab = _first(gecco, "openEHR-EHR-OBSERVATION.laboratory_test_result.v1")
    lab["name"]["value"] = "Befund Erika Mustermann"  # a name is data: it may be free text
    status = _item(_first(gecco, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"), "at0005")
    status["value"]["defining_code"]["code_string"] = "at9999"
    with pytest.raises(MappingError) as error:
        _map(gecco)
    reason = str(error.value)
    assert "Mustermann" not in reason and "name/value" not in reason
    assert "/content[openEHR-EHR-OBSERVATION.laboratory_test_result.v1,0]/data/events[0]/analyte[0]" in reason


def test_unmapped_entries_with_the_same_archetype_stay_apart_without_their_names() -> None:
    paths = [u.path for u in _map(_load("compo_corona")).unmapped if "symptom_sign_screening" in u.path]
    assert len(paths) == len(set(paths)) > 1
    assert not [p for p in paths if "name/value" in p]


_DOSAGE = "openEHR-EHR-CLUSTER.dosage.v1"


def _medication_order(dosage: dict | None = None) -> dict:
    """An order of 2 tablets once a day, written the way the adapter writes orders back (one dose cluster)."""
    order = {
        "resourceType": "MedicationRequest",
        "id": "m",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "Tamoxifen 20 mg"},
        "authoredOn": "2024-03-01T10:00:00+01:00",
        "dosageInstruction": [
            dosage
            or {
                "text": "as directed",
                "doseAndRate": [{"doseQuantity": {"value": 2, "unit": "tablet"}}],
                "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
            }
        ],
    }
    return resource_to_composition(order, composer="cdrsync", recorded_at="2024-03-01T10:00:00+01:00")


def _dose_clusters(composition: dict) -> list:
    return [i for i in composition["content"][0]["activities"][0]["description"]["items"] if i.get("items")]


def _dosages(composition: dict) -> list:
    (request,) = [r for r in _map(composition).resources if r["resourceType"] == "MedicationRequest"]
    validate_resource(request)
    return request["dosageInstruction"]


def _frequency_value(composition: dict) -> dict:
    timing = _first(composition, "openEHR-EHR-CLUSTER.timing_daily.v1")
    return _item(timing, "at0003")["value"]


def test_every_dose_of_a_medication_order_becomes_a_concurrent_dosage() -> None:
    composition = _medication_order()
    (dose,) = [c for c in _dose_clusters(composition) if c["archetype_node_id"] == _DOSAGE]
    evening = orjson.loads(orjson.dumps(dose))
    _item(evening, "at0144")["value"]["magnitude"] = 1
    _item(evening, "openEHR-EHR-CLUSTER.timing_daily.v1")["items"][0]["value"]["magnitude"] = 3
    composition["content"][0]["activities"][0]["description"]["items"].append(evening)
    dosages = _dosages(composition)
    assert [(d["doseAndRate"][0]["doseQuantity"]["value"], d["timing"]["repeat"]["frequency"]) for d in dosages] == [
        (2, 1),
        (1, 3),
    ]
    assert {d["sequence"] for d in dosages} == {1}  # one sequence number: concurrent, not consecutive phases
    assert {d["text"] for d in dosages} == {"as directed"}


@pytest.mark.parametrize(("units", "period_unit"), [("1/d", "d"), ("1/h", "h"), ("1/min", "min"), ("1/s", "s")])
def test_a_frequency_per_hour_minute_or_second_becomes_its_timing_not_nothing(units, period_unit) -> None:
    composition = _medication_order()
    _frequency_value(composition).update(units=units, magnitude=4)
    (dosage,) = _dosages(composition)
    assert dosage["timing"]["repeat"] == {"frequency": 4, "period": 1, "periodUnit": period_unit}


def test_a_frequency_range_becomes_frequency_and_frequency_max() -> None:
    composition = _medication_order()
    single = _frequency_value(composition)
    timing = _first(composition, "openEHR-EHR-CLUSTER.timing_daily.v1")
    timing["items"][0]["value"] = {
        "_type": "DV_INTERVAL",
        "lower": single | {"magnitude": 3},
        "upper": single | {"magnitude": 4},
        "lower_unbounded": False,
        "upper_unbounded": False,
    }
    (dosage,) = _dosages(composition)
    assert dosage["timing"]["repeat"] == {"frequency": 3, "frequencyMax": 4, "period": 1, "periodUnit": "d"}


@pytest.mark.parametrize(("units", "magnitude"), [("1/wk", 2), ("1/d", 1.5), ("1/d", 0)])
def test_a_frequency_fhir_cannot_state_is_a_mapping_error_not_dropped(units, magnitude) -> None:
    composition = _medication_order()
    _frequency_value(composition).update(units=units, magnitude=magnitude)
    with pytest.raises(MappingError, match="frequency"):
        _map(composition)


def test_a_dose_element_no_rule_reads_is_a_mapping_error_naming_it() -> None:
    composition = _medication_order()
    (dose,) = [c for c in _dose_clusters(composition) if c["archetype_node_id"] == _DOSAGE]
    dose["items"].append(
        {
            "_type": "ELEMENT",
            "name": {"_type": "DV_TEXT", "value": "Dose description"},
            "archetype_node_id": "at0178",
            "value": {"_type": "DV_TEXT", "value": "half a tablet on bad days"},
        }
    )
    with pytest.raises(MappingError, match="at0178") as error:
        _map(composition)
    assert "bad days" not in str(error.value)


def test_consecutive_therapeutic_directions_are_a_mapping_error_not_concurrent_doses() -> None:
    composition = _medication_order()
    items = composition["content"][0]["activities"][0]["description"]["items"]
    (dose,) = [c for c in items if c.get("archetype_node_id") == _DOSAGE]
    items.remove(dose)
    for _ in range(2):
        items.append(
            {
                "_type": "CLUSTER",
                "name": {"_type": "DV_TEXT", "value": "Therapeutic direction"},
                "archetype_node_id": "openEHR-EHR-CLUSTER.therapeutic_direction.v1",
                "items": [dose],
            }
        )
    with pytest.raises(MappingError, match="therapeutic directions"):
        _map(composition)
