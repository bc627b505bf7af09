import orjson
import pytest

from pipeline.identity import ORIGIN_TAG_SYSTEM, route_resource
from pipeline.ids import target_id
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.references import logical_system
from tests.conftest import debezium_value, first_of, row

pytestmark = pytest.mark.unit
POS = SourcePosition("cdc.site-a.fhir.resource", 0, 7)


def routed(config, resource, site="site-a", op="c"):
    before, after = (row(resource), None) if op == "d" else (None, row(resource))
    record = normalize_change(config.sites[site], debezium_value(op, before, after), POS)
    [result] = route_resource(record, config.sites[site])
    return result


def test_observation_references_are_rewritten_to_target_ids(config) -> None:
    observation = first_of("ORU-R01-01", "Observation")
    result = routed(config, observation)
    body = orjson.loads(result.resource)
    patient_source = observation["subject"]["reference"].split("/")[1]
    assert body["id"] == result.target_id == target_id("site-a", "Observation", observation["id"])
    assert body["subject"]["reference"] == f"Patient/{target_id('site-a', 'Patient', patient_source)}"
    assert f"Patient/{target_id('site-a', 'Patient', patient_source)}" in result.dependencies
    assert result.patient_key == target_id("site-a", "Patient", patient_source)


def test_references_to_types_not_carried_become_logical_references(config) -> None:
    observation = first_of("ORU-R01-01", "Observation")
    performers = [p["reference"] for p in observation.get("performer", [])]
    assert performers, "sample should reference practitioners/organizations"
    body = orjson.loads(routed(config, observation).resource)
    for original, rewritten in zip(performers, body["performer"], strict=True):
        resource_type, source_id = original.split("/")
        assert "reference" not in rewritten
        assert rewritten["type"] == resource_type
        assert rewritten["identifier"] == {"system": logical_system("site-a", resource_type), "value": source_id}


def test_patient_and_its_records_share_the_patient_key(config) -> None:
    patient = first_of("ADT-A01-01", "Patient")
    encounter = first_of("ADT-A01-01", "Encounter")
    assert routed(config, patient).patient_key == routed(config, encounter).patient_key


def test_origin_tag_source_identifier_and_no_server_meta(config) -> None:
    patient = {**first_of("ADT-A01-01", "Patient"), "meta": {"versionId": "7", "lastUpdated": "2020-01-01T00:00:00Z"}}
    body = orjson.loads(routed(config, patient).resource)
    assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-a"} in body["meta"]["tag"]
    assert "versionId" not in body["meta"] and "lastUpdated" not in body["meta"]
    assert {"system": logical_system("site-a", "Patient"), "value": patient["id"]} in body["identifier"]


def test_same_resource_from_two_sites_gets_two_target_ids(config) -> None:
    patient = first_of("ADT-A01-01", "Patient")
    assert routed(config, patient, "site-a").target_id != routed(config, patient, "site-b").target_id


def test_delete_is_routed_to_the_same_id_without_body(config) -> None:
    encounter = first_of("ADT-A01-01", "Encounter")
    created, deleted = routed(config, encounter), routed(config, encounter, op="d")
    assert deleted.target_id == created.target_id and deleted.patient_key == created.patient_key
    assert deleted.resource is None and deleted.is_delete
