import orjson
import pytest

from pipeline.errors import EnvelopeError, MappingError, OversizeError
from pipeline.normalize import Filtered, SourcePosition, normalize_change
from pipeline.records import canonical_hash
from pipeline.resources import SUPPORTED_TYPES
from tests.conftest import bundle_resources, debezium_value, first_of, row

pytestmark = pytest.mark.unit
POS = SourcePosition("cdc.site-a.fhir.resource", 2, 41)
SAMPLES = [
    r
    for name in ("ADT-A01-01", "ORU-R01-01", "LAB-ORU-1", "MDM-T02-01", "RDE-O11-01")
    for r in bundle_resources(name)
    if r["resourceType"] in SUPPORTED_TYPES
]


@pytest.mark.parametrize("resource", SAMPLES, ids=lambda r: f"{r['resourceType']}-{r['id'][:8]}")
def test_every_sample_resource_normalizes_with_its_patient(config, resource) -> None:
    record = normalize_change(config.sites["site-a"], debezium_value("c", None, row(resource, 3)), POS)
    assert not isinstance(record, Filtered) and record is not None
    assert (record.site, record.resource_type, record.source_id, record.op) == (
        "site-a",
        resource["resourceType"],
        resource["id"],
        "CREATE",
    )
    assert orjson.loads(record.resource) == resource
    assert record.content_hash == canonical_hash(resource)
    assert record.source_version == 3
    assert (record.origin_topic, record.origin_partition, record.origin_offset) == (POS.topic, 2, 41)
    if resource["resourceType"] == "Patient":
        assert record.patient_ref == f"Patient/{resource['id']}"
    else:
        assert record.patient_ref is None or record.patient_ref.startswith("Patient/")


def test_observation_names_its_patient(config) -> None:
    observation = first_of("ORU-R01-01", "Observation")
    record = normalize_change(config.sites["site-a"], debezium_value("c", None, row(observation)), POS)
    assert record.patient_ref == observation["subject"]["reference"]


def test_delete_keeps_identity_and_patient_but_no_content(config) -> None:
    observation = first_of("ORU-R01-01", "Observation")
    record = normalize_change(config.sites["site-a"], debezium_value("d", row(observation), None), POS)
    assert (record.op, record.resource, record.content_hash) == ("DELETE", None, None)
    assert record.source_id == observation["id"]
    assert record.patient_ref == observation["subject"]["reference"]


def test_tombstone_normalizes_to_nothing(config) -> None:
    assert normalize_change(config.sites["site-a"], None, POS) is None


def test_type_not_declared_for_the_site_is_filtered_not_failed(config) -> None:
    organization = first_of("ADT-A01-01", "Organization")
    result = normalize_change(config.sites["site-a"], debezium_value("c", None, row(organization)), POS)
    assert result == Filtered("site-a", "Organization")


def test_invalid_fhir_is_a_mapping_error_naming_the_element(config) -> None:
    # A real sample: FHIR-Converter's VXU output has a DocumentReference without the required content.
    invalid = next(r for r in bundle_resources("VXU-V04-01") if r["resourceType"] == "DocumentReference")
    invalid = {**invalid, "id": "vxu-docref"}  # the sample has no id; the row gives it one
    with pytest.raises(MappingError, match=r"invalid FHIR R4 DocumentReference: content: Field required"):
        normalize_change(config.sites["site-a"], debezium_value("c", None, row(invalid)), POS)


def test_content_of_another_type_than_the_row_is_rejected(config) -> None:
    patient = first_of("ADT-A01-01", "Patient")
    bad_row = {**row(patient), "resource_type": "Observation"}
    with pytest.raises(MappingError, match="differs from the row"):
        normalize_change(config.sites["site-a"], debezium_value("c", None, bad_row), POS)


def test_change_of_another_table_is_an_envelope_error(config) -> None:
    value = orjson.loads(debezium_value("c", None, row(first_of("ADT-A01-01", "Patient"))))
    value["source"]["table"] = "other"
    with pytest.raises(EnvelopeError, match="not the site's source table"):
        normalize_change(config.sites["site-a"], orjson.dumps(value), POS)


def test_snapshot_rows_take_their_commit_time_from_updated_at(config) -> None:
    patient = first_of("ADT-A01-01", "Patient")
    snapshot = normalize_change(config.sites["site-a"], debezium_value("r", None, row(patient)), POS)
    streamed = normalize_change(config.sites["site-a"], debezium_value("c", None, row(patient)), POS)
    assert snapshot.source_commit_ms == 1795235430123  # row updated_at 2026-11-21T04:30:30.123456Z
    assert streamed.source_commit_ms == 1700000000000  # source.ts_ms


def test_a_row_of_no_fhir_type_at_all_is_an_error_not_filtered(config) -> None:
    bogus = {"resourceType": "Foo", "id": "f1"}
    with pytest.raises(MappingError, match="unknown resource type 'Foo'"):
        normalize_change(config.sites["site-a"], debezium_value("c", None, row(bogus)), POS)


def test_a_change_larger_than_the_limit_is_oversize(config) -> None:
    observation = first_of("ORU-R01-01", "Observation")
    value = debezium_value("c", None, row(observation))
    with pytest.raises(OversizeError, match=f"{len(value)} bytes exceeds the limit of {len(value) - 1} bytes"):
        normalize_change(config.sites["site-a"], value, POS, max_bytes=len(value) - 1)
    assert normalize_change(config.sites["site-a"], value, POS, max_bytes=len(value)) is not None


def test_an_observation_whose_patient_is_an_absolute_url_is_a_mapping_error(config) -> None:
    """Through the stage it is dead-lettered with this reason (stage normalize, class mapping), never written
    to central attached to no Patient."""
    observation = first_of("ORU-R01-01", "Observation")
    absolute = {**observation, "subject": {"reference": "https://fhir.site-a.example/Patient/123"}}
    with pytest.raises(MappingError, match=r"Observation.subject names its patient as an absolute URL"):
        normalize_change(config.sites["site-a"], debezium_value("c", None, row(absolute)), POS)
