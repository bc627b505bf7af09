"""normalize_changes for the openehr and hl7v2 adapters: many resources per captured row, deletes of
what a new composition version dropped, problems reported (never dropped), inbox deletes ignored."""

from __future__ import annotations

import copy

import orjson
import pytest

from pipeline.config import SiteConfig, load_sites
from pipeline.errors import ConfigError, EnvelopeError, MappingError
from pipeline.normalize import SourcePosition, normalize_changes
from tests.golden.hl7v2_cases import MESSAGES, read_message
from tests.golden.openehr_cases import COMPOSITIONS

pytestmark = pytest.mark.unit
POS = SourcePosition("cdc.site-d.openehr.composition", 1, 7)


def envelope(site: SiteConfig, op: str, before: dict | None, after: dict | None) -> bytes:
    """A Debezium change of the site's source table (JSON converter, schemas disabled)."""
    assert site.source is not None
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": {
                "ts_ms": 1700000000000,
                "db": site.source.database,
                "schema": site.source.schema_name,
                "table": site.source.table,
                "lsn": 4711,
                "snapshot": "false",
            },
            "op": op,
            "ts_ms": 1700000000100,
        }
    )


def composition_row(name: str, version: int = 1, content: dict | None = None) -> dict:
    body = content if content is not None else orjson.loads((COMPOSITIONS / f"{name}.json").read_bytes())
    return {
        "uid": f"uid-{name}",
        "system_id": "site-d.example",
        "version": version,
        "ehr_id": "2d6a3e0c-6a5f-4f5e-9a7e-1c9b1f0e7a11",
        "subject_id": "D123456789",
        "subject_namespace": "kvid-10",
        "template_id": None,
        "content": orjson.dumps(body).decode(),
        "updated_at": "2024-03-01T09:00:00Z",
    }


def message_row(name: str, row_id: int = 1) -> dict:
    return {
        "id": row_id,
        "control_id": "x",
        "message_type": "x",
        "message": read_message(MESSAGES / f"{name}.hl7"),
        "received_at": "2024-03-01T09:00:00Z",
        "updated_at": "2024-03-01T09:00:00Z",
    }


@pytest.fixture
def site_d(config) -> SiteConfig:
    return config.sites["site-d"]


@pytest.fixture
def site_c(config) -> SiteConfig:
    return config.sites["site-c"]


def test_a_composition_becomes_its_patient_then_its_resources(site_d) -> None:
    batch = normalize_changes(site_d, envelope(site_d, "c", None, composition_row("laboratory_report")), POS)
    assert [r.resource_type for r in batch.records] == ["Patient", "Encounter", "DiagnosticReport", "Observation"]
    assert not batch.problems and not batch.filtered
    patient = orjson.loads(batch.records[0].resource)
    assert {"system": "http://fhir.de/sid/gkv/kvid-10", "value": "D123456789"} in patient["identifier"]
    assert {r.patient_ref for r in batch.records} == {f"Patient/{patient['id']}"}
    assert {r.op for r in batch.records} == {"CREATE"} and {r.source_version for r in batch.records} == {1}
    assert (batch.records[0].origin_topic, batch.records[0].origin_offset) == (POS.topic, 7)


def test_unmapped_archetypes_are_problems_and_the_rest_still_flows(site_d) -> None:
    batch = normalize_changes(site_d, envelope(site_d, "c", None, composition_row("compo_corona")), POS)
    assert [r.resource_type for r in batch.records] == ["Patient", "Encounter", "Observation"]
    assert len(batch.problems) == 10
    assert all(
        p.startswith("composition uid-compo_corona::site-d.example::1: no mapping rule for archetype ")
        for p in batch.problems
    )
    assert any("openEHR-EHR-OBSERVATION.story.v1" in p for p in batch.problems)


def test_a_new_version_without_an_entry_deletes_that_entrys_resources(site_d) -> None:
    ips = orjson.loads((COMPOSITIONS / "ips_canonical.json").read_bytes())
    trimmed = copy.deepcopy(ips)
    trimmed["content"] = [
        s for s in trimmed["content"] if "blood_pressure" not in orjson.dumps(s).decode()
    ]  # the section holding vital signs
    before, after = composition_row("ips_canonical", 1, ips), composition_row("ips_canonical", 2, trimmed)
    batch = normalize_changes(site_d, envelope(site_d, "u", before, after), POS)
    deletes = [r for r in batch.records if r.op == "DELETE"]
    first = normalize_changes(site_d, envelope(site_d, "c", None, before), POS)
    second = {r.source_id for r in batch.records if r.op != "DELETE"}
    gone = {r.source_id for r in first.records} - second
    assert gone and {r.source_id for r in deletes} == gone
    assert all(r.resource is None and r.patient_ref == first.records[0].patient_ref for r in deletes)
    assert {r.source_id for r in batch.records if r.op == "UPDATE"} <= {r.source_id for r in first.records}


def _with_blood_pressure_over_24_hours(composition: dict) -> dict:
    """The composition with its blood-pressure reading made a 24 h maximum (an INTERVAL_EVENT), which no
    FHIR R4 Observation can say: that entry is refused."""
    changed = copy.deepcopy(composition)

    def walk(node):
        if isinstance(node, dict):
            if node.get("archetype_node_id") == "openEHR-EHR-OBSERVATION.blood_pressure.v2":
                node["data"]["events"][0].update(
                    _type="INTERVAL_EVENT",
                    width={"_type": "DV_DURATION", "value": "PT24H"},
                    math_function={
                        "_type": "DV_CODED_TEXT",
                        "value": "maximum",
                        "defining_code": {"terminology_id": {"value": "openehr"}, "code_string": "144"},
                    },
                )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(changed)
    return changed


def test_an_entry_its_rule_refuses_is_a_problem_and_the_other_entries_still_flow(site_d) -> None:
    ips = orjson.loads((COMPOSITIONS / "ips_canonical.json").read_bytes())
    whole = normalize_changes(site_d, envelope(site_d, "c", None, composition_row("ips_canonical", 1, ips)), POS)
    refused = _with_blood_pressure_over_24_hours(ips)
    batch = normalize_changes(site_d, envelope(site_d, "c", None, composition_row("ips_canonical", 1, refused)), POS)
    problems = [p for p in batch.problems if "INTERVAL_EVENT" in p]
    assert len(problems) == 1 and "openEHR-EHR-OBSERVATION.blood_pressure.v2,0]" in problems[0]
    assert 0 < len(batch.records) < len(whole.records)  # the rest of the composition is written
    assert {r.source_id for r in batch.records} < {r.source_id for r in whole.records}


def test_an_entry_refused_in_a_new_version_is_not_deleted_for_that(site_d) -> None:
    """The hospital changed the composition; one entry of the new version cannot be mapped (a dead letter says
    which). Its resources from the version before stay at central: the entry is still there."""
    ips = orjson.loads((COMPOSITIONS / "ips_canonical.json").read_bytes())
    before = composition_row("ips_canonical", 1, ips)
    after = composition_row("ips_canonical", 2, _with_blood_pressure_over_24_hours(ips))
    batch = normalize_changes(site_d, envelope(site_d, "u", before, after), POS)
    assert [r for r in batch.records if r.op == "DELETE"] == []
    assert any("INTERVAL_EVENT" in p for p in batch.problems)


def test_a_deleted_composition_deletes_everything_but_the_patient(site_d) -> None:
    row = composition_row("laboratory_report")
    batch = normalize_changes(site_d, envelope(site_d, "d", row, None), POS)
    assert [(r.resource_type, r.op) for r in batch.records] == [
        ("Encounter", "DELETE"),
        ("DiagnosticReport", "DELETE"),
        ("Observation", "DELETE"),
    ]
    created = normalize_changes(site_d, envelope(site_d, "c", None, row), POS)
    assert [r.source_id for r in batch.records] == [r.source_id for r in created.records[1:]]


def test_a_delete_without_before_image_is_rejected(site_d) -> None:
    row = {k: v for k, v in composition_row("laboratory_report").items() if k != "content"}
    with pytest.raises(EnvelopeError, match="REPLICA IDENTITY FULL"):
        normalize_changes(site_d, envelope(site_d, "d", row, None), POS)


def test_an_update_without_before_image_still_flows_and_says_what_it_cannot_delete(site_d) -> None:
    row = composition_row("laboratory_report", 2)
    batch = normalize_changes(site_d, envelope(site_d, "u", None, row), POS)
    assert len(batch.records) == 4
    assert batch.problems == [
        "no before-image of the composition (REPLICA IDENTITY FULL missing): "
        "entries this version removed are not deleted"
    ]


def test_an_hl7_message_becomes_many_records_with_its_problems(site_c) -> None:
    batch = normalize_changes(site_c, envelope(site_c, "c", None, message_row("ADT-A01-01", 41)), POS)
    assert [r.resource_type for r in batch.records] == [
        "Patient",
        "Encounter",
        "Coverage",
        "AllergyIntolerance",
        "Condition",
        "Procedure",
    ]
    assert batch.problems == [
        "ADT^A01: OBX (segment 14): OBX-5 of type NM repeats (2 values); an Observation holds one"
    ]
    assert {r.source_version for r in batch.records} == {41}
    again = normalize_changes(site_c, envelope(site_c, "c", None, message_row("ADT-A08-01", 42)), POS)
    assert [r.source_id for r in again.records] == [r.source_id for r in batch.records]


def test_an_inbox_delete_is_housekeeping_not_a_clinical_delete(site_c) -> None:
    batch = normalize_changes(site_c, envelope(site_c, "d", message_row("ADT-A01-01"), None), POS)
    assert batch.records == [] and batch.problems == []


def test_a_message_type_not_carried_is_a_mapping_error(site_c) -> None:
    with pytest.raises(MappingError, match="SIU"):
        normalize_changes(site_c, envelope(site_c, "c", None, message_row("SIU-S12-01")), POS)


def test_types_the_site_does_not_carry_are_filtered(site_c) -> None:
    narrow = site_c.model_copy(update={"resource_types": ["Patient", "Encounter"]})
    batch = normalize_changes(narrow, envelope(narrow, "c", None, message_row("ADT-A01-01")), POS)
    assert [r.resource_type for r in batch.records] == ["Patient", "Encounter"]
    assert sorted(f.resource_type for f in batch.filtered) == [
        "AllergyIntolerance",
        "Condition",
        "Coverage",
        "Procedure",
    ]


def test_a_change_of_another_table_is_rejected(site_c, site_d) -> None:
    with pytest.raises(EnvelopeError, match="not the site's source table"):
        normalize_changes(site_c, envelope(site_d, "c", None, composition_row("laboratory_report")), POS)


def test_an_unknown_time_zone_in_a_site_file_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text("site: x\nadapter: hl7v2\ntimezone: Mars/Olympus\n")
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        load_sites([path])
