"""Test cases built from real sample resources, with ids unique to one test run."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from itertools import count
from types import EllipsisType
from typing import Any

import orjson

from pipeline.backflow import hospital_form
from pipeline.patientmove import move_request
from pipeline.records import NormalizedResource, RoutedResource, canonical_hash
from pipeline.resources import SUPPORTED_TYPES
from tests.conftest import bundle_resources

Resource = dict[str, Any]
KVNR_SYSTEM = "http://fhir.de/sid/gkv/kvid-10"  # the shared identifier of sites/site-*.yaml


def kvnr_of(patient_id: str) -> str:
    """The test convention: a patient's insurance number derives from its id."""
    return f"K-{patient_id}"


def with_kvnr(patient: Resource, value: str | None) -> Resource:
    """A Patient with its shared identifier set (or removed, for None)."""
    others = [i for i in patient.get("identifier", []) if i.get("system") != KVNR_SYSTEM]
    return {**patient, "identifier": others + ([{"system": KVNR_SYSTEM, "value": value}] if value else [])}


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, list):
        return [_rewrite(item, mapping) for item in node]
    if isinstance(node, dict):
        out = {key: _rewrite(value, mapping) for key, value in node.items()}
        reference = node.get("reference")
        if isinstance(reference, str) and reference in mapping:
            out["reference"] = mapping[reference]
        return out
    return node


def tumour_case(prefix: str) -> list[Resource]:
    """One patient with every synced type: ADT-A01's record, MDM-T02's report, RDE-O11's medication order,
    plus a tumour-board Flag, a CarePlan and a decision QuestionnaireResponse. Bundle order (Patient first)."""
    adt = [r for r in bundle_resources("ADT-A01-01") if r["resourceType"] in SUPPORTED_TYPES]
    patient = next(r for r in adt if r["resourceType"] == "Patient")
    extra: list[Resource] = []
    mapping: dict[str, str] = {}
    for bundle in ("MDM-T02-01", "RDE-O11-01"):
        resources = [r for r in bundle_resources(bundle) if r["resourceType"] in SUPPORTED_TYPES]
        for r in resources:
            if r["resourceType"] == "Patient":  # the same person: point at ADT-A01's patient
                mapping[f"Patient/{r['id']}"] = f"Patient/{patient['id']}"
            else:
                extra.append(r)
    adt_refs = {f"{a['resourceType']}/{a['id']}" for a in adt}
    resources = adt + [r for r in extra if f"{r['resourceType']}/{r['id']}" not in adt_refs]
    ids = {f"{r['resourceType']}/{r['id']}": f"{prefix}-{n}" for n, r in enumerate(resources)}
    patient_ref = "Patient/" + patient["id"]
    new_patient = "Patient/" + ids[patient_ref]
    mapping = {**{old: f"{old.split('/')[0]}/{new}" for old, new in ids.items()}, **dict.fromkeys(mapping, new_patient)}
    case = []
    for r in resources:
        copy_ = _rewrite(copy.deepcopy(r), mapping)
        copy_["id"] = ids[f"{r['resourceType']}/{r['id']}"]
        case.append(copy_)
    case[0] = with_kvnr(case[0], kvnr_of(case[0]["id"]))
    subject = {"reference": f"Patient/{case[0]['id']}"}
    encounter_ref = {"reference": f"Encounter/{next(r['id'] for r in case if r['resourceType'] == 'Encounter')}"}
    case += [
        {
            "resourceType": "Flag",
            "id": f"{prefix}-flag",
            "status": "active",
            "subject": subject,
            "encounter": encounter_ref,
            "code": {"coding": [{"system": "urn:cdrsync:flag", "code": "tumorboard", "display": "Tumour board"}]},
        },
        {
            "resourceType": "CarePlan",
            "id": f"{prefix}-plan",
            "status": "active",
            "intent": "plan",
            "subject": subject,
            "encounter": encounter_ref,
            "title": "Adjuvant chemotherapy, 4 cycles",
        },
        {
            "resourceType": "QuestionnaireResponse",
            "id": f"{prefix}-decision",
            "status": "completed",
            "subject": subject,
            "encounter": encounter_ref,
            "item": [{"linkId": "recommendation", "answer": [{"valueString": "Breast-conserving surgery"}]}],
        },
    ]
    assert case[0]["resourceType"] == "Patient"
    return case


def observation_for(prefix: str, patient_id: str, n: int, value: float, encounter_id: str | None = None) -> Resource:
    """A body-weight Observation (LOINC 29463-7) of a patient, in an encounter if given."""
    observation: Resource = {
        "resourceType": "Observation",
        "id": f"{prefix}-obs-{n}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": f"2026-11-{1 + n % 28:02d}T08:00:00Z",
        "valueQuantity": {"value": value, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"},
    }
    if encounter_id is not None:
        observation["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    return observation


def encounter_for(prefix: str, patient_id: str, n: int = 0) -> Resource:
    """A finished ambulatory Encounter of a patient."""
    return {
        "resourceType": "Encounter",
        "id": f"{prefix}-enc-{n}",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


def patient(prefix: str, n: int = 0) -> Resource:
    """A minimal Patient."""
    patient_id = f"{prefix}-pat-{n}"
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "gender": "female",
        "birthDate": "1968-03-14",
        "identifier": [
            {"system": "urn:example:mrn", "value": f"{prefix}-{n}"},
            {"system": KVNR_SYSTEM, "value": kvnr_of(patient_id)},
        ],
    }


def tumorboard_flag(flag_id: str, patient_id: str, encounter_id: str | None, status: str = "active") -> Resource:
    """A tumour-board Flag on a patient's encounter, as a clinician's tick in the HIS creates it."""
    flag: Resource = {
        "resourceType": "Flag",
        "id": flag_id,
        "status": status,
        "code": {"coding": [{"system": "urn:cdrsync:flag", "code": "tumorboard", "display": "Tumour board"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }
    if encounter_id is not None:
        flag["encounter"] = {"reference": f"Encounter/{encounter_id}"}
    return flag


DECISION_QUESTIONNAIRE = "http://cdrsync.local/fhir/Questionnaire/tumorboard-decision"


def decision_response(patient_ref: str, board_date: str = "2026-11-20") -> Resource:
    """A tumour-board decision with all 20 fields of fhir/questionnaire-tumorboard-decision.json (case study 000)."""

    def answer(link: str, kind: str, value: Any) -> Resource:
        return {"linkId": link, "answer": [{kind: value}]}

    case = [
        answer("board-date", "valueDate", board_date),
        answer("referring-physician", "valueString", "Dr. A. Gyn, Hospital B"),
        answer("question", "valueString", "Primary therapy for newly diagnosed breast cancer?"),
        answer("diagnosis", "valueCoding", {"system": "http://fhir.de/CodeSystem/bfarm/icd-10-gm", "code": "C50.4"}),
        answer("relevant-findings", "valueString", "MRI Breast: 3.2 cm irregular mass, BIRADS 5"),
        answer("medical-history", "valueString", "58-year-old, premenopausal, no family cancer history"),
        answer("tnm-stage", "valueString", "cT2 cN0 cM0, Stage IIA"),
        answer("pathology-summary", "valueString", "Invasive ductal carcinoma, G2, ER 80%, PR 60%, HER2-negative"),
        answer("lab-values", "valueString", "Hb 12.8, WBC 6200, Plt 245k, CEA 2.1, CA 15-3 18"),
        answer("ecog", "valueCoding", {"system": "http://loinc.org", "code": "LA9622-7", "display": "0 Fully active"}),
    ]
    decision = [
        answer("recommendation", "valueString", "Breast-conserving surgery + sentinel biopsy; adjuvant TC, tamoxifen"),
        answer("rationale", "valueString", "Good operability. Ki67 25% + G2 justify chemo. HR+/HER2- endocrine"),
        answer("treatment-intent", "valueCoding", {"system": "http://snomed.info/sct", "code": "373808002"}),
        answer("guideline-conform", "valueBoolean", True),
        answer("trial-eligible", "valueBoolean", False),
        answer("patient-preference", "valueBoolean", True),
        answer("participants", "valueString", "Gynecology, Oncology, Radiology, Pathology, Radiation Therapy, Nurse"),
        answer("responsible-physician", "valueString", "Dr. A. Gyn"),
        answer("follow-up", "valueDate", "2027-02-20"),
        answer("signed", "valueDateTime", f"{board_date}T16:30:00+01:00"),
    ]
    return {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": DECISION_QUESTIONNAIRE,
        "status": "completed",
        "subject": {"reference": patient_ref},
        "authored": f"{board_date}T16:30:00+01:00",
        "item": [{"linkId": "case", "item": case}, {"linkId": "decision", "item": decision}],
    }


def routed_record(
    resource: Resource | None,
    *,
    patient_key: str,
    op: str = "UPDATE",
    site: str = "site-a",
    target: str = "central",
    resource_type: str | None = None,
    source_id: str | None = None,
    target_id: str | None = None,
    origin: tuple[str, int, int] = ("t", 0, 0),
    source_version: int | None = 1,
    source_lsn: int | None = None,
    content_hash: str | EllipsisType | None = ...,
    dependencies: Iterable[str] = (),
    source_commit_ms: int = 0,
    captured_ms: int = 0,
) -> RoutedResource:
    """A record of `site` for `target` (by default a ready record of site-a for central), carrying `resource`
    as JSON; a DELETE carries no resource. Its type and ids are the resource's own unless given;
    `content_hash` defaults to the resource's canonical hash (None for a DELETE)."""
    known = resource or {}  # where the type and ids come from when not given
    body = None if op == "DELETE" else resource
    if isinstance(content_hash, EllipsisType):
        content_hash = None if body is None else canonical_hash(body)
    return RoutedResource(
        source_commit_ms=source_commit_ms,
        captured_ms=captured_ms,
        origin_topic=origin[0],
        origin_partition=origin[1],
        origin_offset=origin[2],
        site=site,
        target=target,
        resource_type=known["resourceType"] if resource_type is None else resource_type,
        source_id=known["id"] if source_id is None else source_id,
        target_id=known["id"] if target_id is None else target_id,
        patient_key=patient_key,
        op=op,
        resource=None if body is None else orjson.dumps(body).decode(),
        content_hash=content_hash,
        dependencies=list(dependencies),
        source_version=source_version,
        source_lsn=source_lsn,
    )


def hospital_copy(central_id: str, version: int, decision: str | None, *, target: str) -> RoutedResource:
    """Central's version `version` of a decision (a Basic resource) as the write-back record of `target`'s
    copy, in the hospital's form; decision None: its deletion."""
    central = {"resourceType": "Basic", "id": central_id, "code": {"text": decision or "deleted"}}
    body = hospital_form(central, "central", "patient-key", "local-patient", version)
    return routed_record(
        body,
        site="central",
        target=target,
        source_id=central_id,
        patient_key="patient-key",
        op="DELETE" if decision is None else "UPDATE",
        origin=("cdc.central.fhir.resource", 0, version),
        source_version=version,
        content_hash=None,
    )


def untagged_copy(copy: RoutedResource) -> Resource:
    """A hospital copy's body as written before versions were tagged (or by hand): no version tag, and
    its decision text "untagged"."""
    assert copy.resource is not None
    untagged: Resource = orjson.loads(copy.resource)
    untagged["meta"]["tag"] = [t for t in untagged["meta"]["tag"] if t["system"] != "urn:cdrsync:source-version"]
    untagged["code"]["text"] = "untagged"
    return untagged


def partition_of(patient_key: str, partitions: int) -> int:
    """The partition a patient's records go to on a topic keyed by the patient key (Kafka's default partitioner,
    murmur2, as the worker's producers use it)."""
    from aiokafka.partitioner import murmur2

    return (murmur2(patient_key.encode()) & 0x7FFFFFFF) % partitions


def key_in_another_partition(prefix: str, other_key: str, partitions: int, system: str = KVNR_SYSTEM) -> str:
    """A shared identifier, starting with prefix, whose patient key is in another partition than other_key's: a
    move between the two Patients then crosses partitions (and may cross workers), as it mostly does."""
    from pipeline.identity import global_patient_key

    where = partition_of(other_key, partitions)
    return next(
        value
        for value in (f"{prefix}{n}" for n in range(1000))
        if partition_of(global_patient_key(system, value), partitions) != where
    )


def move_of(
    previous: str,
    new: str,
    *,
    site: str = "site-a",
    local: str = "a-1",
    lsn: int = 9,
    decided_ms: int = 1_700_000_000_000,
) -> RoutedResource:
    """The MOVE the identity stage sends for central when a reviewer accepts that the site's patient `local`,
    at Patient/previous, is the person of Patient/new (its accepted Patient version at source position lsn)."""
    accepted = NormalizedResource(
        source_commit_ms=1,
        captured_ms=2,
        origin_topic="fhir.normalized.v1",
        origin_partition=0,
        origin_offset=5,
        site=site,
        resource_type="Patient",
        source_id=local,
        op="UPDATE",
        resource="{}",
        source_lsn=lsn,
    )
    return move_request(accepted, "central", previous, new, decided_ms)


_positions = count(100)  # source LSNs of the records below: each later than the one before


def patient_version(key: str, site: str = "site-a", local: str = "a-1") -> RoutedResource:
    """A site's version of the central Patient `key` (its local patient `local`), as the order stage gets it."""
    body = {"resourceType": "Patient", "id": key, "identifier": [{"system": f"urn:mrn:{site}", "value": local}]}
    return routed_record(body, site=site, source_id=local, target_id=key, patient_key=key, source_lsn=next(_positions))


def patient_resource(
    kind: str, name: str, key: str, *deps: str, site: str = "site-a", op: str = "UPDATE"
) -> RoutedResource:
    """A site's change of a resource of Patient `key` (its id: `name`) naming `deps` (Type/id), as the order stage
    gets it."""
    body = {"resourceType": kind, "id": name, "subject": {"reference": f"Patient/{key}"}}
    body["focus"] = [{"reference": d} for d in deps]
    return routed_record(
        body,
        site=site,
        resource_type=kind,
        source_id=name,
        target_id=name,
        patient_key=key,
        op=op,
        source_lsn=next(_positions),
        dependencies=[] if op == "DELETE" else sorted({f"Patient/{key}", *deps}),
    )
