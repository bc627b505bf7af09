"""Segment mappers: one HL7 v2 segment (with its context) → one FHIR resource. Pure functions."""

from __future__ import annotations

from typing import Any

from ...errors import MappingError
from .datatypes import (
    Hl7Context,
    clean,
    cwe_to_codeable,
    cx_to_identifier,
    hl7_source_id,
    xad_to_address,
    xcn_to_reference,
    xpn_to_name,
    xtn_to_telecom,
)
from .er7 import Rep, Segment
from .tables import (
    ALLERGY_CATEGORY,
    ALLERGY_SEVERITY,
    ENCOUNTER_CLASS,
    GENDER,
    ORDER_STATUS,
    REPORT_STATUS,
    V3_ACT_CODE,
)

__all__ = [
    "al1_to_allergy",
    "dg1_to_condition",
    "in1_to_coverage",
    "patient_key",
    "pid_to_patient",
    "pr1_to_procedure",
    "pv1_to_encounter",
    "ztb_to_flag",
]


def _identifiers(reps: list[Rep], ctx: Hl7Context) -> list[dict[str, Any]]:
    return [i for i in (cx_to_identifier(r, ctx) for r in reps) if i]


def patient_key(pid: Segment) -> tuple[str, str]:
    """(assigning authority, value) naming the patient: the first PID-3 repetition of type MR, else the first."""
    reps = pid.reps(3)
    if not reps:
        raise MappingError("PID-3 (patient identifier list) is empty: the message names no patient")
    chosen = next((r for r in reps if r.c(5) == "MR"), reps[0])
    value = chosen.c(1)
    if not value:
        raise MappingError("PID-3 has no identifier value")
    return chosen.c(4, 1) or chosen.c(4, 2) or "", value


def merged_key(mrg: Segment) -> tuple[str, str]:
    """(assigning authority, value) of the record an ADT^A40 merges away: MRG-1 (prior patient identifier
    list), chosen as PID-3 is (patient_key), so it names the local patient its earlier messages named."""
    reps = mrg.reps(1)
    chosen = next((r for r in reps if r.c(5) == "MR"), reps[0] if reps else None)
    if chosen is None or not chosen.c(1):
        raise MappingError("MRG-1 (prior patient identifier list) is empty: the merge names no record to merge")
    return chosen.c(4, 1) or chosen.c(4, 2) or "", str(chosen.c(1))


def merged_identifiers(mrg: Segment, ctx: Hl7Context) -> list[dict[str, Any]]:
    """The merged record's own identifiers (MRG-1), as `old` ones."""
    return [{**identifier, "use": "old"} for identifier in _identifiers(mrg.reps(1), ctx)]


def pid_to_patient(pid: Segment, ctx: Hl7Context) -> dict[str, Any]:
    """PID → Patient: identifiers (PID-3 repeats), names (5), birth date (7), gender (8), address (11),
    phones (13, 14), death (29, 30)."""
    authority, value = patient_key(pid)
    deceased_at, deceased = ctx.when(pid.get(29), "PID-29"), pid.get(30)
    return clean(
        {
            "resourceType": "Patient",
            "id": hl7_source_id("Patient", authority, value),
            "identifier": _identifiers(pid.reps(3), ctx),
            "name": [n for n in (xpn_to_name(r) for r in pid.reps(5)) if n],
            "telecom": [t for t in (xtn_to_telecom(r) for r in [*pid.reps(13), *pid.reps(14)]) if t],
            "gender": GENDER.get(pid.get(8) or ""),
            "birthDate": ctx.day(pid.get(7), "PID-7"),
            "deceasedDateTime": deceased_at,
            "deceasedBoolean": {"Y": True, "N": False}.get(deceased or "") if not deceased_at else None,
            "address": [a for a in (xad_to_address(r) for r in pid.reps(11)) if a],
        }
    )


def encounter_id(pv1: Segment, patient_id: str) -> str | None:
    """The Encounter's source id: visit number (PV1-19), else the admit time (PV1-44); None if neither."""
    visit = pv1.rep(19)
    if visit and visit.c(1):
        return hl7_source_id("Encounter", patient_id, visit.c(4, 1) or visit.c(4, 2), visit.c(1))
    admitted = pv1.get(44)
    return hl7_source_id("Encounter", patient_id, "admitted", admitted) if admitted else None


def pv1_to_encounter(pv1: Segment, ctx: Hl7Context, patient_ref: str, event: str) -> dict[str, Any] | None:
    """PV1 → Encounter: class (PV1-2), location (3), attending (7), visit number (19), period (44, 45)."""
    source_id = encounter_id(pv1, patient_ref.removeprefix("Patient/"))
    if source_id is None:
        return None
    start, end = ctx.when(pv1.get(44), "PV1-44"), ctx.when(pv1.get(45), "PV1-45")
    patient_class = pv1.get(2) or ""
    code, display = ENCOUNTER_CLASS.get(patient_class, ("UNK", "unknown"))
    system = V3_ACT_CODE if code != "UNK" else "http://terminology.hl7.org/CodeSystem/v3-NullFlavor"
    status = _encounter_status(event, end)
    location = pv1.rep(3)
    where = " ".join(p for p in (location.c(1), location.c(2), location.c(3)) if p) if location else None
    visit = pv1.rep(19)
    visit_identifier = cx_to_identifier(visit, ctx) if visit else None
    if visit_identifier is not None:
        visit_identifier.setdefault(
            "type", {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "VN"}]}
        )
    attending = xcn_to_reference(pv1.rep(7))
    return clean(
        {
            "resourceType": "Encounter",
            "id": source_id,
            "identifier": [visit_identifier] if visit_identifier else [],
            "status": status,
            "class": {"system": system, "code": code, "display": display},
            "subject": {"reference": patient_ref},
            "participant": [{"individual": attending}] if attending else [],
            "period": clean({"start": start, "end": end}),
            "location": [{"location": {"display": where}}] if where else [],
        }
    )


def _encounter_status(event: str, end: str | None) -> str:
    """The ADT event (and PV1-45) → Encounter.status, after the v2-to-FHIR event → encounter-status map."""
    if event == "A11":  # cancel admit/visit: the visit did not take place as admitted
        return "cancelled"
    if end or event == "A03":
        return "finished"
    return "planned" if event == "A05" else "in-progress"


def in1_to_coverage(in1: Segment, ctx: Hl7Context, patient_ref: str) -> dict[str, Any]:
    """IN1 → Coverage: plan (IN1-2), company (3, 4), group (8), period (12, 13), plan type (15), policy (36)."""
    policy, plan = in1.get(36), in1.rep(2)
    company = in1.get(4)
    company_id = in1.rep(3)
    payor = clean(
        {
            "display": company,
            "identifier": cx_to_identifier(company_id, ctx) if company_id else None,
        }
    )
    return clean(
        {
            "resourceType": "Coverage",
            "id": hl7_source_id("Coverage", patient_ref, plan.c(1) if plan else None, policy, in1.get(1)),
            "identifier": [{"value": policy}] if policy else [],
            "status": "active",
            "type": cwe_to_codeable(in1.rep(15)),
            "beneficiary": {"reference": patient_ref},
            "period": clean({"start": ctx.day(in1.get(12), "IN1-12"), "end": ctx.day(in1.get(13), "IN1-13")}),
            # FHIR needs a payor; a policy without a company name still names the plan.
            "payor": [payor or {"display": (plan.c(2) or plan.c(1)) if plan else "unknown payor"}],
            "class": [
                clean(
                    {
                        "type": {
                            "coding": [
                                {"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}
                            ]
                        },
                        "value": plan.c(1),
                        "name": plan.c(2),
                    }
                )
            ]
            if plan and plan.c(1)
            else [],
        }
    )


def al1_to_allergy(al1: Segment, ctx: Hl7Context, patient_ref: str) -> dict[str, Any]:
    """AL1 → AllergyIntolerance: type (AL1-2), allergen (3), severity (4), reaction (5), identified (6)."""
    allergen = cwe_to_codeable(al1.rep(3))
    if allergen is None:
        raise MappingError("AL1-3 (allergen) is empty")
    reaction = [r for r in (al1.get(5),) if r]
    category = ALLERGY_CATEGORY.get(al1.get(2) or "")
    return clean(
        {
            "resourceType": "AllergyIntolerance",
            "id": hl7_source_id(
                "AllergyIntolerance", patient_ref, (allergen.get("coding") or [{}])[0].get("code"), allergen.get("text")
            ),
            "clinicalStatus": {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}
                ]
            },
            "category": [category] if category else [],
            "code": allergen,
            "patient": {"reference": patient_ref},
            "onsetDateTime": ctx.when(al1.get(6), "AL1-6"),
            "reaction": [
                clean(
                    {
                        "manifestation": [{"text": r} for r in reaction],
                        "severity": ALLERGY_SEVERITY.get(al1.get(4) or ""),
                    }
                )
            ]
            if reaction
            else [],
        }
    )


def dg1_to_condition(dg1: Segment, ctx: Hl7Context, patient_ref: str, encounter_ref: str | None) -> dict[str, Any]:
    """DG1 → Condition (encounter diagnosis): code (DG1-3, description 4 as text), onset (5), id (20);
    DG1-21 action code D (delete) is a MappingError, never an upsert."""
    _check_action(dg1, 21, "Condition")
    code: dict[str, Any] = cwe_to_codeable(dg1.rep(3)) or {}
    if dg1.get(4):
        code["text"] = dg1.get(4)
    if not code:
        raise MappingError("DG1-3/DG1-4 (diagnosis) are empty")
    identity = dg1.rep(20)
    key = identity.c(1) if identity else (code.get("coding") or [{}])[0].get("code") or code.get("text")
    return clean(
        {
            "resourceType": "Condition",
            "id": hl7_source_id("Condition", patient_ref, encounter_ref, key),
            "identifier": [{"value": identity.c(1)}] if identity and identity.c(1) else [],
            "category": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/condition-category",
                            "code": "encounter-diagnosis",
                        }
                    ]
                }
            ],
            "code": code,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "onsetDateTime": ctx.when(dg1.get(5), "DG1-5"),
        }
    )


def pr1_to_procedure(pr1: Segment, ctx: Hl7Context, patient_ref: str, encounter_ref: str | None) -> dict[str, Any]:
    """PR1 → Procedure (completed): code (PR1-3, else text 4), performed (5), id (19); PR1-20 action code D
    (delete) is a MappingError, never an upsert."""
    _check_action(pr1, 20, "Procedure")
    code = cwe_to_codeable(pr1.rep(3)) or ({"text": pr1.get(4)} if pr1.get(4) else None)
    if code is None:
        raise MappingError("PR1-3/PR1-4 (procedure) are empty")
    identity = pr1.rep(19)
    key = identity.c(1) if identity else f"{(code.get('coding') or [{}])[0].get('code')}@{pr1.get(5)}"
    return clean(
        {
            "resourceType": "Procedure",
            "id": hl7_source_id("Procedure", patient_ref, encounter_ref, key),
            "status": "completed",  # PR1 reports procedures performed (HL7 v2.8 6.5.4)
            "code": code,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "performedDateTime": ctx.when(pr1.get(5), "PR1-5"),
        }
    )


# Table 0206 segment action code: A add, U update, X no change are what the segment says; D delete is not.
_UPSERT_ACTIONS = ("A", "U", "X")


def _check_action(segment: Segment, field: int, resource_type: str) -> None:
    """A segment's action code (table 0206): its resource is written for A, U, X or none; D is a deletion,
    which this adapter does not emit (the inbox row carries upserts only), so it is reported, not upserted."""
    action = segment.get(field)
    if action is None or action in _UPSERT_ACTIONS:
        return
    where = f"{segment.name}-{field}"
    if action == "D":
        raise MappingError(f"{where} action code D (delete): the hl7v2 adapter does not delete a {resource_type}")
    raise MappingError(f"{where} action code {action!r} is not one of A, D, U, X")


TUMORBOARD = {"system": "urn:cdrsync:flag", "code": "tumorboard", "display": "Tumour board"}
_FLAG_STATUS = {"A": "active", "I": "inactive", "E": "entered-in-error"}


def ztb_to_flag(ztb: Segment, ctx: Hl7Context, patient_ref: str, encounter_ref: str | None) -> dict[str, Any]:
    """ZTB (cdrsync's tumour-board Z-segment, docs/mapping/hl7v2.md) → Flag with code `tumorboard`.

    ZTB-1 set id, ZTB-2 flag code (CWE, code must be `tumorboard`), ZTB-3 status (A/I/E), ZTB-4 start,
    ZTB-5 end, ZTB-6 author (XCN).
    """
    flag_code = ztb.get(2)
    if flag_code != "tumorboard":
        raise MappingError(f"ZTB-2 flag code {flag_code!r} is not 'tumorboard'")
    status = _FLAG_STATUS.get(ztb.get(3) or "")
    if status is None:
        raise MappingError(f"ZTB-3 status {ztb.get(3)!r} is not one of A, I, E")
    return clean(
        {
            "resourceType": "Flag",
            "id": hl7_source_id("Flag", patient_ref, encounter_ref, "tumorboard"),
            "status": status,
            "code": {"coding": [TUMORBOARD], "text": "Tumour board"},
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "period": clean({"start": ctx.when(ztb.get(4), "ZTB-4"), "end": ctx.when(ztb.get(5), "ZTB-5")}),
            "author": xcn_to_reference(ztb.rep(6)),
        }
    )


def order_status(orc: Segment | None) -> str:
    """ORC-5 order status (else ORC-1 control code) → request status."""
    if orc is None:
        return "active"
    return ORDER_STATUS.get(orc.get(5) or "", ORDER_STATUS.get(orc.get(1) or "", "unknown"))


def report_status(code: str | None) -> str:
    """OBR-25 result status → DiagnosticReport.status."""
    return REPORT_STATUS.get(code or "", "unknown")
