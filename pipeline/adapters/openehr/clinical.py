"""Mappers for EVALUATION, INSTRUCTION, ACTION and ADMIN_ENTRY archetypes (pure functions)."""

from __future__ import annotations

from typing import Any

from ...errors import MappingError
from . import rules
from .context import Context
from .rm import (
    coded_to_codeable,
    element,
    element_value,
    elements,
    exact_magnitude,
    fhir_datetime,
    find_clusters,
    local_code,
    text_of,
)
from .tnm import tnm_to_stage

__all__ = [
    "adverse_reaction_risk_to_allergy",
    "document_attachment_to_document_reference",
    "medication_order_to_medication_request",
    "problem_diagnosis_to_condition",
    "procedure_to_procedure",
    "service_request_to_service_request",
]

_CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
_ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
_QUALIFIER = "openEHR-EHR-CLUSTER.problem_qualifier.v1"


def _status(system: str, code: str | None) -> dict[str, Any] | None:
    return {"coding": [{"system": system, "code": code}]} if code else None


def _time(value: dict[str, Any] | None, ctx: Context) -> str | None:
    return fhir_datetime(str(value["value"]), ctx.tz) if value and value.get("value") else None


def _concept(node: Any, at_code: str, archetype: str) -> dict[str, Any] | None:
    return coded_to_codeable(element_value(node, at_code), archetype)


def _concepts(node: Any, at_code: str, archetype: str) -> list[dict[str, Any]]:
    found = (coded_to_codeable(e.get("value"), archetype) for e in elements(node, at_code))
    return [c for c in found if c]


def _notes(*texts: str | None) -> list[dict[str, str]]:
    return [{"text": text} for text in texts if text]


def _checked(table: dict[str, Any], code: str | None, what: str, archetype: str) -> Any:
    """The table's value for an at-code; an at-code the table does not know is a mapping error, not a guess."""
    if code is None:
        return None
    if code not in table:
        raise MappingError(f"{archetype}: unknown {what} code {code}")
    return table[code]


def _condition_clinical_status(data: Any, abated: bool) -> str | None:
    """problem_qualifier.v1: remission (at0089) > resolution phase (at0083) > active/inactive (at0003)."""
    qualifier = next(find_clusters(data, _QUALIFIER), None)
    remission = local_code(element_value(qualifier, "at0089"))
    phase = local_code(element_value(qualifier, "at0083"))
    active = local_code(element_value(qualifier, "at0003"))
    if remission == "at0090":
        return "remission"
    if phase == "at0084":
        return "resolved"
    if phase == "at0097" and not abated:  # FHIR con-4: an abated condition cannot be in relapse
        return "relapse"
    return _checked({"at0026": "active", "at0027": "inactive"}, active, "active/inactive", _QUALIFIER)


def _certainty(code: str | None, archetype: str) -> dict[str, Any] | None:
    """Diagnostic certainty → verificationStatus; the archetype's own code rides along as a second coding,
    because FHIR's `provisional` stands for both `suspected` and `probable` and the way back needs which."""
    status = _status(_CONDITION_VERIFICATION, _checked(rules.DIAGNOSTIC_CERTAINTY, code, "certainty", archetype))
    if status is not None:
        status["coding"].append({"system": f"urn:openehr:archetype:{archetype}", "code": code})
    return status


def _condition_category(ctx: Context) -> dict[str, Any]:
    code = "problem-list-item" if ctx.persistent else "encounter-diagnosis"
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": code}]}


def problem_diagnosis_to_condition(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """EVALUATION.problem_diagnosis.v1 → Condition (name, body site, onset, abatement, severity, statuses,
    TNM stage) and the TNM staging Observations (tnm.py)."""
    archetype = str(entry["archetype_node_id"])
    data = entry.get("data")
    code = _concept(data, "at0002", archetype)
    if code is None:
        raise MappingError(f"{archetype}: problem/diagnosis without a name (at0002) at {path}")
    abatement = _time(element_value(data, "at0030"), ctx)
    severity = _checked(rules.CONDITION_SEVERITY, local_code(element_value(data, "at0005")), "severity", archetype)
    certainty = local_code(element_value(data, "at0073"))
    stages, staging_observations = tnm_to_stage(data, ctx, path)
    return [
        ctx.resource(
            "Condition",
            path,
            clinicalStatus=_status(_CONDITION_CLINICAL, _condition_clinical_status(data, abatement is not None)),
            verificationStatus=_certainty(certainty, archetype),
            # openEHR records a problem list as a persistent composition, a visit's diagnoses in an event one.
            category=[_condition_category(ctx)],
            severity=(
                {"coding": [{"system": "http://snomed.info/sct", "code": severity[0], "display": severity[1]}]}
                if severity
                else None
            ),
            code=code,
            bodySite=_concepts(data, "at0012", archetype),
            subject=ctx.subject,
            encounter=ctx.encounter,
            onsetDateTime=_time(element_value(data, "at0077"), ctx),
            abatementDateTime=abatement,
            note=_notes(text_of(element_value(data, "at0069"))),
            stage=stages,
        ),
        *staging_observations,
    ]


def _reaction(cluster: dict[str, Any], ctx: Context, archetype: str) -> dict[str, Any]:
    manifestations = _concepts(cluster, "at0011", archetype)
    severity = _checked(rules.REACTION_SEVERITY, local_code(element_value(cluster, "at0089")), "severity", archetype)
    reaction: dict[str, Any] = {
        # FHIR requires a manifestation; a reaction recorded without one says so instead of being dropped.
        "manifestation": manifestations or [{"text": "manifestation not recorded"}],
        "onset": _time(element_value(cluster, "at0027"), ctx),
        "severity": severity,
        "description": text_of(element_value(cluster, "at0012")),
    }
    return {k: v for k, v in reaction.items() if v}


def adverse_reaction_risk_to_allergy(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """EVALUATION.adverse_reaction_risk.v1 → AllergyIntolerance (substance, status, criticality, reactions)."""
    archetype = str(entry["archetype_node_id"])
    data = entry.get("data")
    code = _concept(data, "at0002", archetype)
    if code is None:
        raise MappingError(f"{archetype}: adverse reaction risk without a substance (at0002) at {path}")
    status_code = local_code(element_value(data, "at0063"))
    verification = _checked(rules.ALLERGY_VERIFICATION, status_code, "status", archetype)
    # FHIR ait-1 wants a clinical status unless entered-in-error: a refuted risk is inactive, a resolved one resolved.
    clinical = {"at0067": "resolved", "at0066": "inactive"}.get(status_code or "", "active")
    mechanism = (text_of(element_value(data, "at0058")) or "").strip().lower()
    return [
        ctx.resource(
            "AllergyIntolerance",
            path,
            clinicalStatus=_status(_ALLERGY_CLINICAL, clinical),
            verificationStatus=_status(_ALLERGY_VERIFICATION, verification),
            type=mechanism if mechanism in ("allergy", "intolerance") else None,
            criticality=_checked(
                rules.ALLERGY_CRITICALITY, local_code(element_value(data, "at0101")), "criticality", archetype
            ),
            code=code,
            patient=ctx.subject,
            encounter=ctx.encounter,
            note=_notes(text_of(element_value(data, "at0006"))),
            reaction=[_reaction(c, ctx, archetype) for c in elements(data, "at0009")],
        )
    ]


def _ism_state(entry: dict[str, Any]) -> str:
    transition = entry.get("ism_transition") or {}
    code = local_code(transition.get("current_state"))
    if code is None:
        raise MappingError(f"{entry['archetype_node_id']}: ACTION without an ism_transition current_state")
    return code


def procedure_to_procedure(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """ACTION.procedure.v1 → Procedure; status from the ISM current state, performed time from ACTION.time."""
    archetype = str(entry["archetype_node_id"])
    state = _ism_state(entry)
    status = _checked(rules.ISM_TO_PROCEDURE_STATUS, state, "ISM state", archetype)
    description = entry.get("description")
    code = _concept(description, "at0002", archetype)
    if code is None:
        raise MappingError(f"{archetype}: procedure without a name (at0002) at {path}")
    performed = _time(entry.get("time"), ctx) if state in rules.PERFORMED_STATES else None
    return [
        ctx.resource(
            "Procedure",
            path,
            status=status,
            code=code,
            subject=ctx.subject,
            encounter=ctx.encounter,
            performedDateTime=performed,
            bodySite=_concepts(description, "at0063", archetype),
            note=_notes(text_of(element_value(description, "at0005"))),
        )
    ]


def _activities(entry: dict[str, Any]) -> list[dict[str, Any]]:
    activities = entry.get("activities") or []
    if not activities:
        raise MappingError(f"{entry['archetype_node_id']}: INSTRUCTION without activities")
    return list(activities)


def service_request_to_service_request(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """INSTRUCTION.service_request.v1 → one ServiceRequest per activity (service, reason, urgency, timing)."""
    archetype = str(entry["archetype_node_id"])
    requester_id = text_of(element_value(entry.get("protocol"), "at0010"))
    resources = []
    for index, activity in enumerate(_activities(entry)):
        detail = activity.get("description")
        code = _concept(detail, "at0121", archetype)
        if code is None:
            raise MappingError(f"{archetype}: activity {index} without a service name (at0121)")
        start, end = _time(element_value(detail, "at0145"), ctx), _time(element_value(detail, "at0144"), ctx)
        period = {k: v for k, v in (("start", start), ("end", end)) if v}
        urgency = local_code(element_value(detail, "at0068"))
        request = ctx.resource(
            "ServiceRequest",
            f"{path}/activities[{index}]",
            status="active",  # an INSTRUCTION's progress lives in its ACTIONs; the order itself stands
            intent="order",
            priority=_checked(rules.SERVICE_URGENCY, urgency, "urgency", archetype),
            code=code,
            subject=ctx.subject,
            encounter=ctx.encounter,
            occurrencePeriod=period or None,
            occurrenceDateTime=None if period else _time(element_value(detail, "at0040"), ctx),
            authoredOn=ctx.start_time,
            reasonCode=[c for c in [_concept(detail, "at0062", archetype)] if c],
            note=_notes(text_of(element_value(detail, "at0135")), text_of(element_value(detail, "at0150"))),
        )
        if requester_id:
            request["identifier"].append(
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}]},
                    "value": requester_id,
                }
            )
        resources.append(request)
    return resources


_DOSAGE = "openEHR-EHR-CLUSTER.dosage.v1"
_TIMING_DAILY = "openEHR-EHR-CLUSTER.timing_daily.v1"
_DIRECTION = "openEHR-EHR-CLUSTER.therapeutic_direction.v1"


def _refuse_unread(cluster: dict[str, Any], read: set[str], archetype: str, path: str) -> None:
    """An element with content that no rule reads is a MappingError naming its node, never a silent loss."""
    for item in cluster.get("items") or []:
        node = str(item.get("archetype_node_id", ""))
        if node not in read and (item.get("value") is not None or item.get("items")):
            raise MappingError(f"{archetype}: {node} at {path} has no MedicationRequest mapping")


def _per_period(value: dict[str, Any], path: str) -> dict[str, Any]:
    magnitude = exact_magnitude(value, _TIMING_DAILY, "frequency")
    unit = rules.FREQUENCY_UNITS.get(str(value.get("units")))
    if unit is None or magnitude < 1 or magnitude != int(magnitude):  # FHIR frequency is a positiveInt
        raise MappingError(f"{_TIMING_DAILY}: frequency at {path} is not a whole number per 1/d, 1/h, 1/min or 1/s")
    return {"frequency": int(magnitude), "period": 1, "periodUnit": unit}


def _frequency(timing: dict[str, Any], path: str) -> dict[str, Any]:
    """CLUSTER.timing_daily.v1 Frequency → Timing.repeat frequency per period (a range: frequency..frequencyMax)."""
    _refuse_unread(timing, {"at0003"}, _TIMING_DAILY, path)
    value = element_value(timing, "at0003")
    if value is None:
        return {}
    if value.get("_type") == "DV_QUANTITY":
        return _per_period(value, path)
    low, high = (value.get(side) for side in ("lower", "upper"))
    if value.get("_type") != "DV_INTERVAL" or not isinstance(low, dict) or not isinstance(high, dict):
        raise MappingError(f"{_TIMING_DAILY}: frequency at {path} is neither a quantity nor a closed range")
    repeat, most = _per_period(low, path), _per_period(high, path)
    if most["periodUnit"] != repeat["periodUnit"]:
        raise MappingError(f"{_TIMING_DAILY}: frequency range at {path} mixes units")
    return repeat | {"frequencyMax": most["frequency"]}


def _dose(cluster: dict[str, Any], path: str) -> dict[str, Any] | None:
    """CLUSTER.dosage.v1 dose amount (at0144) and unit (at0145) → Dosage.doseAndRate (quantity or range)."""
    _refuse_unread(cluster, {"at0144", "at0145", "at0164", _TIMING_DAILY}, _DOSAGE, path)
    amount, unit = element_value(cluster, "at0144"), text_of(element_value(cluster, "at0145"))
    with_unit = {"unit": unit} if unit else {}
    if amount is None:
        return None
    if amount.get("_type") == "DV_QUANTITY":
        return {"doseQuantity": {"value": exact_magnitude(amount, _DOSAGE, "dose amount")} | with_unit}
    if amount.get("_type") == "DV_INTERVAL":
        limits = [(key, amount.get(side)) for side, key in (("lower", "low"), ("upper", "high"))]
        bounds = {
            key: {"value": exact_magnitude(limit, _DOSAGE, "dose amount")} | with_unit
            for key, limit in limits
            if isinstance(limit, dict)
        }
        if bounds:
            return {"doseRange": bounds}
    raise MappingError(f"{_DOSAGE}: dose amount at {path} is neither a quantity nor a range")


def _one_dosage(order: dict[str, Any], cluster: dict[str, Any] | None, timings: list[Any], path: str) -> dict[str, Any]:
    """One Dosage: the order's text, route and bounds (order["bounds"]), a dose cluster's dose and its daily timing."""
    if len(timings) > 1:
        raise MappingError(f"{_DOSAGE}: {len(timings)} daily timings for one dose at {path}; a Dosage has one timing")
    dose = _dose(cluster, path) if cluster is not None else None
    repeat = _frequency(timings[0], path) if timings else {}
    if order["bounds"]:
        repeat["boundsPeriod"] = dict(order["bounds"])
    dosage = {
        "text": order["text"],
        "route": order["route"],
        "doseAndRate": [dose] if dose else None,
        "timing": {"repeat": repeat} if repeat else None,
    }
    return {k: v for k, v in dosage.items() if v}


def _dose_sequence(cluster: dict[str, Any]) -> int:
    count = element_value(cluster, "at0164")  # Dosage sequence: the order of a day's doses
    return int(count["magnitude"]) if count and "magnitude" in count else 0


def _dosages(detail: Any, archetype: str, ctx: Context, path: str) -> list[dict[str, Any]]:
    """medication_order.v3 activity → Dosages: one per CLUSTER.dosage.v1 (text, route, dose, frequency, bounds)."""
    directions = list(find_clusters(detail, _DIRECTION))
    if len(directions) > 1:
        raise MappingError(f"{archetype}: several therapeutic directions (dosing phases) at {path} have no mapping")
    for direction in directions:  # its duration, repetition, … would bound or space the doses: not carried yet
        _refuse_unread(direction, {"at0057", _DOSAGE}, _DIRECTION, path)
    details = element(detail, "at0113")
    start, end = _time(element_value(details, "at0012"), ctx), _time(element_value(details, "at0013"), ctx)
    order = {
        "text": text_of(element_value(detail, "at0009")),
        "route": _concept(detail, "at0091", archetype),
        "bounds": {k: v for k, v in (("start", start), ("end", end)) if v},
    }
    clusters = list(find_clusters(detail, _DOSAGE))
    timings = list(find_clusters(detail, _TIMING_DAILY))
    if len(clusters) <= 1:  # one dose: its daily timing may also sit beside the dose cluster
        dosage = _one_dosage(order, clusters[0] if clusters else None, timings, path)
        return [dosage] if dosage else []
    if sum(len(list(find_clusters(c, _TIMING_DAILY))) for c in clusters) != len(timings):
        raise MappingError(f"{archetype}: a daily timing at {path} belongs to none of its {len(clusters)} doses")
    # The doses of one direction are a day's pattern (2 tablets mornings, 1 evenings): concurrent Dosages,
    # which FHIR states with one sequence number for all (Dosage.sequence).
    return [
        _one_dosage(order, cluster, list(find_clusters(cluster, _TIMING_DAILY)), path) | {"sequence": 1}
        for cluster in sorted(clusters, key=_dose_sequence)
    ]


def medication_order_to_medication_request(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """INSTRUCTION.medication_order.v3 → one MedicationRequest per activity (medication, dose, route, timing)."""
    archetype = str(entry["archetype_node_id"])
    resources = []
    for index, activity in enumerate(_activities(entry)):
        detail = activity.get("description")
        medication = _concept(detail, "at0070", archetype)
        if medication is None:
            raise MappingError(f"{archetype}: activity {index} without a medication item (at0070)")
        dosages = _dosages(detail, archetype, ctx, f"{path}/activities[{index}]")
        resources.append(
            ctx.resource(
                "MedicationRequest",
                f"{path}/activities[{index}]",
                status="active",
                intent="order",
                medicationCodeableConcept=medication,
                subject=ctx.subject,
                encounter=ctx.encounter,
                authoredOn=ctx.start_time,
                dosageInstruction=dosages,
            )
        )
    return resources


def document_attachment_to_document_reference(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """ADMIN_ENTRY.document_attachment.v0 → DocumentReference, one content per CLUSTER.media_file.v1."""
    archetype = str(entry["archetype_node_id"])
    data = entry.get("data")
    contents = []
    for media in find_clusters(data, "openEHR-EHR-CLUSTER.media_file.v1"):
        value = element_value(media, "at0001") or {}
        if value.get("_type") != "DV_MULTIMEDIA":
            raise MappingError(f"{archetype}: media file without DV_MULTIMEDIA content at {path}")
        attachment = {
            "contentType": (value.get("media_type") or {}).get("code_string"),
            "data": value.get("data"),
            "url": (value.get("uri") or {}).get("value"),
            "size": value.get("size"),
            "title": text_of(element_value(media, "at0002")),
            "creation": _time(element_value(media, "at0004"), ctx),
        }
        contents.append({"attachment": {k: v for k, v in attachment.items() if v is not None}})
    if not contents:
        raise MappingError(f"{archetype}: document attachment without a media file at {path}")
    doc_status = {"at0010": "final", "at0009": "preliminary"}.get(local_code(element_value(data, "at0008")) or "")
    return [
        ctx.resource(
            "DocumentReference",
            path,
            status="current",
            docStatus=doc_status,
            description=text_of(element_value(data, "at0005")),
            subject=ctx.subject,
            date=ctx.start_time,
            content=contents,
            context={"encounter": [ctx.encounter]} if ctx.encounter else None,
        )
    ]
