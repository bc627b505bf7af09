"""An openEHR composition and HL7 v2 messages written in their site databases arrive at the central server
as the FHIR resources their mapping rules make; a new composition version deletes what it dropped."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from pipeline.adapters.hl7v2 import Hl7Context, message_to_resources
from pipeline.adapters.openehr import CompositionSource, composition_to_resources
from pipeline.cli import main as cdrsync
from pipeline.config import Config, SiteConfig
from pipeline.demo import site_dsn
from pipeline.identity import ORIGIN_TAG_SYSTEM, global_patient_key
from pipeline.ids import target_id
from pipeline.references import logical_system
from tests.casebuilder import KVNR_SYSTEM
from tests.golden.openehr_cases import COMPOSITIONS
from tests.integration.conftest import SETTINGS, Central, Worker, audit_rows, wait_for

pytestmark = pytest.mark.integration
SYNC_TIMEOUT = 240


def _kvnr(seed: str) -> str:
    return "Z" + str(int(hashlib.sha256(seed.encode()).hexdigest(), 16) % 10**9).zfill(9)


@pytest.fixture
def connect(config: Config) -> Iterator[Any]:
    connections = []

    def open_(site: str) -> psycopg.Connection:
        conn = psycopg.connect(
            site_dsn(
                config.sites[site], SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value
            ),
            autocommit=True,
        )
        connections.append(conn)
        return conn

    yield open_
    for conn in connections:
        conn.close()


def _central_id(site: SiteConfig, resource: dict[str, Any], kvnr: str) -> str:
    if resource["resourceType"] == "Patient":
        return global_patient_key(KVNR_SYSTEM, kvnr)
    return target_id(site.site, resource["resourceType"], resource["id"])


def _missing(stack: Central, site: SiteConfig, resources: list[dict[str, Any]], kvnr: str) -> list[str]:
    return [
        f"{r['resourceType']}/{r['id']}"
        for r in resources
        if stack.read(r["resourceType"], _central_id(site, r, kvnr)) is None
    ]


def _present(stack: Central, site: SiteConfig, resources: list[dict[str, Any]], kvnr: str) -> list[str]:
    return [
        f"{r['resourceType']}/{r['id']}"
        for r in resources
        if stack.read(r["resourceType"], _central_id(site, r, kvnr)) is not None
    ]


def _write_composition(conn: psycopg.Connection, source: CompositionSource, content: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO openehr.composition (uid, system_id, version, ehr_id, subject_id, subject_namespace, content) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (uid) DO UPDATE SET version = EXCLUDED.version, "
        "content = EXCLUDED.content, updated_at = now()",
        (
            source.uid,
            source.system_id,
            source.version,
            source.ehr_id,
            source.subject_id,
            source.subject_namespace,
            orjson.dumps(content).decode(),
        ),
    )


def test_an_openehr_composition_arrives_and_its_next_version_deletes_what_it_dropped(
    worker: Worker, stack: Central, config: Config, connect, run_id: str
) -> None:
    site = config.sites["site-d"]
    kvnr = _kvnr(f"{run_id}-openehr")
    source = CompositionSource(f"{run_id}-lab", "site-d.example", 1, f"ehr-{run_id}", kvnr, "kvid-10")
    lab = orjson.loads((COMPOSITIONS / "laboratory_report.json").read_bytes())
    mapped = composition_to_resources(lab, source, site.zone, site.identifier_systems)
    expected = [mapped.patient, *mapped.resources]
    assert [r["resourceType"] for r in expected] == ["Patient", "Encounter", "DiagnosticReport", "Observation"]

    conn = connect("site-d")
    _write_composition(conn, source, lab)
    wait_for(
        lambda: not _missing(stack, site, expected, kvnr),
        timeout=SYNC_TIMEOUT,
        what="the composition's Patient, Encounter, DiagnosticReport and Observation at central",
    )

    observation = stack.read("Observation", _central_id(site, expected[3], kvnr))
    assert observation is not None
    assert observation["code"]["coding"][0]["code"] == "2093-3"
    assert observation["valueQuantity"]["value"] == 203 and observation["valueQuantity"]["code"] == "mg/dL"
    assert observation["subject"]["reference"] == f"Patient/{global_patient_key(KVNR_SYSTEM, kvnr)}"
    assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-d"} in observation["meta"]["tag"]

    without_result = {**lab, "content": []}  # version 2 no longer holds the lab result entry
    _write_composition(conn, CompositionSource(**{**source.__dict__, "version": 2}), without_result)
    wait_for(
        lambda: not _present(stack, site, expected[2:], kvnr),
        timeout=SYNC_TIMEOUT,
        what="the dropped entry's DiagnosticReport and Observation deleted at central",
    )
    assert not _missing(stack, site, expected[:2], kvnr), "the Patient and Encounter must stay"


def test_a_composition_with_unmapped_archetypes_writes_what_maps_and_dead_letters_the_rest(
    worker: Worker, stack: Central, config: Config, connect, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site = config.sites["site-d"]
    kvnr = _kvnr(f"{run_id}-partial")
    source = CompositionSource(f"{run_id}-corona", "site-d.example", 1, f"ehr-{run_id}-p", kvnr, "kvid-10")
    corona = orjson.loads((COMPOSITIONS / "compo_corona.json").read_bytes())
    mapped = composition_to_resources(corona, source, site.zone, site.identifier_systems)
    expected = [mapped.patient, *mapped.resources]
    assert [r["resourceType"] for r in expected] == ["Patient", "Encounter", "Observation"] and mapped.unmapped

    _write_composition(connect("site-d"), source, corona)
    wait_for(lambda: not _missing(stack, site, expected, kvnr), timeout=SYNC_TIMEOUT, what="what maps, at central")

    def letters() -> list[dict[str, Any]]:
        assert cdrsync(["dlq", "list", "--json", "--stage", "normalize", "--include-resolved", "--since", "30m"]) == 0
        lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        return [d for d in lines if f"composition {source.uid}::" in (d["reason"] or "")]

    [letter] = wait_for(letters, timeout=120, what="one dead letter naming the parts not mapped")
    assert letter["error_class"] == "mapping" and letter["status"] == "open"
    assert "part(s) not mapped: composition " in letter["reason"]
    assert "no mapping rule for archetype openEHR-EHR-OBSERVATION.story.v1" in letter["reason"]
    audited = wait_for(lambda: audit_rows(source.uid), timeout=60, what="the dead letter's audit row")
    assert [row[0] for row in audited] == ["dead_lettered"]

    # Replayed (say, once a mapping rule is added; here none is): the mapped part is written again under the
    # same ids, never a second copy, and what still does not map is a new dead letter.
    assert cdrsync(["dlq", "replay", letter["id"], "--execute"]) == 0
    capsys.readouterr()
    statuses = wait_for(
        lambda: sorted(d["status"] for d in letters()) if len(letters()) == 2 else None,
        timeout=120,
        what="the replayed dead letter and the new one",
    )
    assert statuses == ["open", "replayed"]
    patient_ref = f"Patient/{_central_id(site, mapped.patient, kvnr)}"
    status, found = stack.get(f"Observation?subject={patient_ref}&_summary=count")
    assert status == 200 and found["total"] == 1


def _message(*segments: str) -> str:
    return "\r".join(segments) + "\r"


def test_hl7_messages_arrive_with_the_tumour_board_flag(
    worker: Worker, stack: Central, config: Config, connect, run_id: str
) -> None:
    site = config.sites["site-c"]
    kvnr = _kvnr(f"{run_id}-hl7")
    pid = f"PID|1||{run_id}^^^SITEC^MR~{kvnr}^^^KVK^NI||Muster^Erika||19640812|F"
    pv1 = f"PV1|1|I|ONK^12^3||||0815^Doc^Dora||||||||||||{run_id}-V1^^^SITEC^VN|||||||||||||||||||||||||20240301090000"
    adt = _message(
        "MSH|^~\\&|HIS|SITEC|CDRSYNC|CENTRAL|20240301101500+0100||ADT^A01|A-" + run_id + "|P|2.5",
        "EVN|A01|20240301101500",
        pid,
        pv1,
        "ZTB|1|tumorboard^Tumour board^urn:cdrsync:flag|A|20240301100000",
    )
    oru = _message(
        "MSH|^~\\&|LAB|SITEC|CDRSYNC|CENTRAL|20240301120000+0100||ORU^R01|O-" + run_id + "|P|2.5",
        pid,
        pv1,
        f"OBR|1||{run_id}-F1^LAB|24317-0^Hemogram^LN|||20240301110000||||||||||||||||F",
        "OBX|1|NM|718-7^Hemoglobin^LN||13.2|g/dL^g/dL^UCUM|12-16|N|||F|||20240301110000",
    )
    context = Hl7Context(site.site, site.zone, site.identifier_systems)
    expected = [*message_to_resources(adt, context).resources, *message_to_resources(oru, context).resources]
    assert [r["resourceType"] for r in expected] == [
        "Patient",
        "Encounter",
        "Flag",
        "Patient",
        "Encounter",
        "Observation",
        "DiagnosticReport",
    ]

    conn = connect("site-c")
    for raw in (adt, oru):
        conn.execute(
            "INSERT INTO hl7v2.message (control_id, message_type, message) VALUES (%s, %s, %s)",
            (raw.split("|")[9], raw.split("|")[8], raw),
        )
    wait_for(
        lambda: not _missing(stack, site, expected, kvnr),
        timeout=SYNC_TIMEOUT,
        what="the messages' Patient, Encounter, Flag, DiagnosticReport and Observation at central",
    )

    flag = stack.read("Flag", _central_id(site, expected[2], kvnr))
    assert flag is not None and flag["status"] == "active"
    assert flag["code"]["coding"][0]["code"] == "tumorboard"
    assert flag["encounter"]["reference"] == f"Encounter/{_central_id(site, expected[1], kvnr)}"
    patient = stack.read("Patient", global_patient_key(KVNR_SYSTEM, kvnr))
    assert patient is not None and patient["birthDate"] == "1964-08-12" and patient["gender"] == "female"
    observation = stack.read("Observation", _central_id(site, expected[5], kvnr))
    assert observation is not None and observation["valueQuantity"] == {
        "value": 13.2,
        "unit": "g/dL",
        "system": "http://unitsofmeasure.org",
        "code": "g/dL",
    }


def test_an_hl7_merge_across_two_insurance_numbers_moves_the_merged_record_s_results_once_a_reviewer_accepts(
    worker: Worker, stack: Central, config: Config, connect, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    site = config.sites["site-c"]
    kvnr_kept, kvnr_merged = _kvnr(f"{run_id}-kept"), _kvnr(f"{run_id}-merged")
    kept_pid = f"PID|1||{run_id}K^^^SITEC^MR~{kvnr_kept}^^^KVK^NI||Muster^Erika||19640812|F"
    merged_pid = f"PID|1||{run_id}M^^^SITEC^MR~{kvnr_merged}^^^KVK^NI||Muster^Erika||19640812|F"
    header = "MSH|^~\\&|HIS|SITEC|CDRSYNC|CENTRAL|20240301101500+0100||{type}|{id}|P|2.5"
    registered = [
        _message(header.format(type="ADT^A04", id=f"R1-{run_id}"), kept_pid),
        _message(header.format(type="ADT^A04", id=f"R2-{run_id}"), merged_pid),
        _message(
            header.format(type="ORU^R01", id=f"O-{run_id}"),
            merged_pid,
            f"OBR|1||{run_id}-M1^LAB|24317-0^Hemogram^LN|||20240301110000||||||||||||||||F",
            "OBX|1|NM|718-7^Hemoglobin^LN||11.9|g/dL^g/dL^UCUM|12-16|L|||F|||20240301110000",
        ),
    ]
    # The hospital finds the second registration was the same woman: it merges it into the first (ADT^A40).
    merge = _message(header.format(type="ADT^A40", id=f"M-{run_id}"), kept_pid, f"MRG|{run_id}M^^^SITEC^MR")
    context = Hl7Context(site.site, site.zone, site.identifier_systems)
    result = message_to_resources(registered[2], context).resources
    observation = next(r for r in result if r["resourceType"] == "Observation")
    _, merged = message_to_resources(merge, context).resources
    observation_id = target_id("site-c", "Observation", observation["id"])
    kept_key, merged_key = global_patient_key(KVNR_SYSTEM, kvnr_kept), global_patient_key(KVNR_SYSTEM, kvnr_merged)

    conn = connect("site-c")

    def insert(raw: str) -> None:
        conn.execute(
            "INSERT INTO hl7v2.message (control_id, message_type, message) VALUES (%s, %s, %s)",
            (raw.split("|")[9], raw.split("|")[8], raw),
        )

    for raw in registered:
        insert(raw)

    def subject() -> str | None:
        return (stack.read("Observation", observation_id) or {}).get("subject", {}).get("reference")

    wait_for(
        lambda: subject() == f"Patient/{merged_key}",
        timeout=SYNC_TIMEOUT,
        what="the second registration's result at its own central Patient",
    )
    assert stack.read("Patient", kept_key) is not None
    insert(merge)

    def review() -> list[dict[str, Any]]:
        capsys.readouterr()
        assert cdrsync(["identity", "list", "--site", "site-c", "--json"]) == 0
        found = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        return [r for r in found if r["local_patient_id"] == merged["id"]]

    [listed] = wait_for(review, timeout=SYNC_TIMEOUT, what="the merge under identity review")
    assert (listed["previous_patient"], listed["proposed_patient"]) == (f"Patient/{merged_key}", f"Patient/{kept_key}")
    # Not applied by itself: the result stays where it was until a person decides.
    assert subject() == f"Patient/{merged_key}"
    capsys.readouterr()
    assert cdrsync(["identity", "accept", "site-c", merged["id"], "--reason", "same woman", "--execute"]) == 0
    wait_for(
        lambda: subject() == f"Patient/{kept_key}",
        timeout=SYNC_TIMEOUT,
        what="the merged registration's result at the surviving patient",
    )
    wait_for(lambda: stack.read("Patient", merged_key) is None, timeout=120, what="the merged record's Patient gone")
    kept = stack.read("Patient", kept_key)
    systems = {(i.get("system"), i.get("value")) for i in kept["identifier"]}
    assert (logical_system("site-c", "Patient"), merged["id"]) not in systems  # only the surviving record's id


def test_an_hl7_result_message_re_queued_after_its_correction_does_not_put_the_old_value_back(
    worker: Worker, stack: Central, config: Config, connect, run_id: str
) -> None:
    """The interface engine re-queues an old message (its inbox row updated): Debezium reads it again, with a new
    LSN. The correction that came after it, in a later row, stays at central; the old message is audited as skipped."""
    site = config.sites["site-c"]
    kvnr = _kvnr(f"{run_id}-hl7-requeue")
    pid = f"PID|1||{run_id}-rq^^^SITEC^MR~{kvnr}^^^KVK^NI||Muster^Erika||19640812|F"
    pv1 = f"PV1|1|I|ONK^12^3||||0815^Doc^Dora||||||||||||{run_id}-RQ^^^SITEC^VN|||||||||||||||||||||||||20240301090000"

    def oru(control: str, sent: str, value: str, status: str) -> str:
        return _message(
            f"MSH|^~\\&|LAB|SITEC|CDRSYNC|CENTRAL|{sent}+0100||ORU^R01|{control}|P|2.5",
            pid,
            pv1,
            f"OBR|1||{run_id}-RQ1^LAB|24317-0^Hemogram^LN|||20240301110000||||||||||||||||{status}",
            f"OBX|1|NM|718-7^Hemoglobin^LN||{value}|g/dL^g/dL^UCUM|12-16|N|||{status}|||20240301110000",
        )

    first = oru(f"P-{run_id}", "20240301120000", "13.2", "P")
    correction = oru(f"C-{run_id}", "20240301150000", "12.1", "C")
    context = Hl7Context(site.site, site.zone, site.identifier_systems)

    def observation_of(raw: str) -> dict[str, Any]:
        return next(r for r in message_to_resources(raw, context).resources if r["resourceType"] == "Observation")

    observation, corrected = observation_of(first), observation_of(correction)
    assert corrected["id"] == observation["id"]  # one result, corrected
    central = _central_id(site, observation, kvnr)

    def value() -> float | None:
        stored = stack.read("Observation", central)
        return None if stored is None else stored["valueQuantity"]["value"]

    conn = connect("site-c")
    rows = []
    for raw in (first, correction):
        inserted = conn.execute(
            "INSERT INTO hl7v2.message (control_id, message_type, message) VALUES (%s, %s, %s) RETURNING id",
            (raw.split("|")[9], raw.split("|")[8], raw),
        ).fetchone()
        assert inserted is not None
        rows.append(inserted[0])
    wait_for(lambda: value() == 12.1, timeout=SYNC_TIMEOUT, what="the corrected haemoglobin at central")
    versions = len(stack.history("Observation", central))

    conn.execute("UPDATE hl7v2.message SET updated_at = now() WHERE id = %s", (rows[0],))  # re-queued
    wait_for(
        lambda: any(
            step == "duplicate_skipped" and target == central for step, target, _ in audit_rows(observation["id"])
        ),
        timeout=SYNC_TIMEOUT,
        what="the re-queued message's Observation audited as skipped",
    )
    assert value() == 12.1
    assert len(stack.history("Observation", central)) == versions
