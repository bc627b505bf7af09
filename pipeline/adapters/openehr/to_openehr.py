"""The way back: FHIR R4 Condition, Observation (vital signs and laboratory), MedicationRequest and
Procedure → an openEHR canonical-JSON COMPOSITION, so central data (e.g. the tumour-board decision)
can be written to an openEHR site.

Each function is the inverse of the forward mapper of the same archetype (entries.py, clinical.py):
whatever the forward mapping reads, this writes, at the same at-codes. A FHIR element the archetype
cannot hold (a status it has no code for, a second note, a dose period in hours, …) raises
MappingError naming it: the way back never drops clinical content silently.
"""

from __future__ import annotations

import uuid
from typing import Any

from ...errors import MappingError
from ...ids import CDRSYNC_NAMESPACE
from . import rules
from .rm_build import (
    code_phrase,
    codes_of,
    dv_coded,
    dv_date_time,
    dv_local,
    dv_quantity,
    dv_text,
    element_node,
    entry_node,
    history_node,
    invert,
    item_tree,
    magnitude_status,
    one_note,
)
from .writeback_medication import medication_request_to_medication_order

__all__ = ["WRITEBACK_TEMPLATE", "resource_to_composition", "writeback_uid"]

WRITEBACK_TEMPLATE = "cdrsync.writeback.v1"


def writeback_uid(resource_type: str, resource_id: str) -> str:
    """The versioned-object uid of the composition a FHIR resource is written to: stable per resource."""
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, f"openehr-writeback|{resource_type}|{resource_id}"))


def _vital_value(resource: dict[str, Any], rule: rules.VitalSign, what: str) -> dict[str, Any] | None:
    if "dataAbsentReason" in resource:
        return None
    quantity = resource.get("valueQuantity")
    if quantity is None:
        raise MappingError(f"{what}: a vital sign needs valueQuantity or dataAbsentReason")
    if rule.code == "2708-6":  # pulse oximetry records SpO2 as a percent proportion
        proportion = {"_type": "DV_PROPORTION", "numerator": quantity["value"], "denominator": 100.0, "type": 2}
        return proportion | magnitude_status(quantity, what)
    return dv_quantity(quantity, what)


def observation_to_vital_signs(resource: dict[str, Any], archetype: str) -> dict[str, Any]:
    """Vital-signs Observation → the OBSERVATION archetype recording its LOINC code (rules.VITAL_SIGNS)."""
    rule = rules.VITAL_SIGNS[archetype]
    what = f"Observation/{resource.get('id')} ({rule.display})"
    if resource.get("status") != "final":
        raise MappingError(f"{what}: status {resource.get('status')!r}; vital-signs archetypes record final values")
    time = resource.get("effectiveDateTime")
    if not time:
        raise MappingError(f"{what}: no effectiveDateTime (openEHR events need a time)")
    if rule.components:
        by_code = {c["code"]["coding"][0]["code"]: c for c in resource.get("component", [])}
        items = [
            element_node(node, display, _vital_value(by_code[code], rule, what) if code in by_code else None)
            for node, code, display in rule.components
        ]
    else:
        items = [element_node(rule.value_node, rule.display, _vital_value(resource, rule, what))]
    name = (resource.get("code") or {}).get("text") or rule.display
    return entry_node("OBSERVATION", archetype, name, data=history_node(rule.structure, time, items))


_LAB = "openEHR-EHR-OBSERVATION.laboratory_test_result.v1"
_ANALYTE = "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"
_ANALYTE_STATUS_TEXT = {
    "at0015": "Registered",
    "at0017": "Preliminary",
    "at0018": "Final",
    "at0019": "Corrected",
    "at0020": "Amended",
    "at0022": "Entered in error",
    "at0023": "Cancelled",
}


_ANALYTE_STATE = {
    "registered": "at0015",
    "preliminary": "at0017",
    "final": "at0018",
    "corrected": "at0019",
    "amended": "at0020",
    "entered-in-error": "at0022",
    "cancelled": "at0023",
}
assert all(rules.ANALYTE_STATUS[code] == status for status, code in _ANALYTE_STATE.items())


def _lab_value(resource: dict[str, Any], what: str) -> dict[str, Any] | None:
    if "valueQuantity" in resource:
        value = dv_quantity(resource["valueQuantity"], what)
        ranges = resource.get("referenceRange") or []
        if len(ranges) > 1:
            raise MappingError(f"{what}: {len(ranges)} reference ranges, DV_QUANTITY holds one normal range")
        if ranges and ("low" in ranges[0] or "high" in ranges[0]):
            value["normal_range"] = _interval(ranges[0], what)
        return value
    if "valueCodeableConcept" in resource:
        return dv_coded(resource["valueCodeableConcept"], _ANALYTE, what)
    if "valueString" in resource:
        return dv_text(resource["valueString"])
    if "dataAbsentReason" in resource:
        return None
    kinds = [k for k in resource if k.startswith("value")]
    raise MappingError(f"{what}: {kinds or 'no value'} has no laboratory analyte mapping")


_V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
# The inverse of entries._NORMAL_STATUS where it is one to one: v3 HH/LL are written as HH/LL (openEHR HHH and
# HH both read as HH). HU/LU (significantly high/low, not critical) are no normal status: written as the
# analyte's coded interpretation (at0004) instead, so they come back as they went.
_TO_NORMAL_STATUS = {"HH": "HH", "H": "H", "N": "N", "L": "L", "LL": "LL"}


def _normal_status(concept: dict[str, Any]) -> str | None:
    """The openehr_normal_statuses code of a v3 interpretation without text of its own, else None."""
    codings = concept.get("coding") or []
    if len(codings) != 1 or codings[0].get("system") != _V3_INTERPRETATION or concept.get("text"):
        return None
    return _TO_NORMAL_STATUS.get(codings[0].get("code", ""))


def _interval(bounds: dict[str, Any], what: str) -> dict[str, Any]:
    interval: dict[str, Any] = {"_type": "DV_INTERVAL", "lower_included": True, "upper_included": True}
    for side, key in (("lower", "low"), ("upper", "high")):
        interval[f"{side}_unbounded"] = key not in bounds
        if key in bounds:
            interval[side] = dv_quantity(bounds[key], what)
    return interval


def observation_to_laboratory_result(resource: dict[str, Any]) -> dict[str, Any]:
    """Laboratory Observation → laboratory_test_result.v1 with one analyte cluster (the inverse of
    _analyte_to_observation: name, value and range, status, interpretation, comment)."""
    what = f"Observation/{resource.get('id')}"
    status = _ANALYTE_STATE.get(resource.get("status") or "")
    if status is None and resource.get("status") != "unknown":  # unknown: the analyte simply has no status
        raise MappingError(f"{what}: status {resource.get('status')!r} has no laboratory_test_analyte code")
    time = resource.get("effectiveDateTime")
    if not time:
        raise MappingError(f"{what}: no effectiveDateTime (openEHR events need a time)")
    interpretations = resource.get("interpretation") or []
    if len(interpretations) > 1:
        raise MappingError(f"{what}: {len(interpretations)} interpretations, the analyte holds one")
    name = dv_coded(resource.get("code"), _ANALYTE, f"{what}: code")
    value = _lab_value(resource, what)
    # A high/low flag on a quantity is the quantity's own normal status, as it came.
    status_flag = _normal_status(interpretations[0]) if interpretations and value and "magnitude" in value else None
    if status_flag and value is not None:
        value["normal_status"] = code_phrase("openehr_normal_statuses", status_flag)
        interpretations = []
    items = [
        element_node("at0024", "Analyte name", name),
        element_node("at0001", "Result value", value),
        element_node("at0004", "Interpretation", dv_coded(interpretations[0], _ANALYTE, what))
        if interpretations
        else None,
        element_node("at0005", "Result status", dv_local(status, _ANALYTE_STATUS_TEXT[status])) if status else None,
        element_node("at0006", "Result status time", dv_date_time(resource["issued"]))
        if resource.get("issued")
        else None,
        element_node("at0003", "Comment", dv_text(note)) if (note := one_note(resource)) else None,
    ]
    analyte = {
        "_type": "CLUSTER",
        "name": dv_text("Analyte result"),
        "archetype_node_id": _ANALYTE,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": _ANALYTE},
            "rm_version": "1.0.4",
        },
        "items": [i for i in items if i is not None],
    }
    test_name = element_node("at0005", "Test name", name)
    return entry_node(
        "OBSERVATION",
        _LAB,
        "Laboratory test result",
        data=history_node(("at0001", "at0002", "at0003"), time, [test_name, analyte]),
    )


_QUALIFIER = "openEHR-EHR-CLUSTER.problem_qualifier.v1"
_CLINICAL_TO_QUALIFIER = {
    "active": ("at0003", "at0026", "Active"),
    "inactive": ("at0003", "at0027", "Inactive"),
    "resolved": ("at0083", "at0084", "Resolved"),
    "relapse": ("at0083", "at0097", "Relapsed"),
    "remission": ("at0089", "at0090", "In remission"),
}
_CERTAINTY_TEXT = {"at0074": "Suspected", "at0075": "Probable", "at0076": "Confirmed"}


def _local_code_of(concept: dict[str, Any] | None, archetype: str) -> str | None:
    """The code of a concept's coding in the archetype's own (local) terminology."""
    system = f"urn:openehr:archetype:{archetype}"
    return next((c.get("code") for c in (concept or {}).get("coding", []) if c.get("system") == system), None)


def condition_to_problem_diagnosis(resource: dict[str, Any]) -> dict[str, Any]:
    """Condition → EVALUATION.problem_diagnosis.v1 (+ CLUSTER.problem_qualifier.v1 for the clinical status)."""
    archetype, what = "openEHR-EHR-EVALUATION.problem_diagnosis.v1", f"Condition/{resource.get('id')}"
    clinical = next(iter(codes_of(resource.get("clinicalStatus"))), None)
    verification = next(
        (
            c.get("code")
            for c in (resource.get("verificationStatus") or {}).get("coding", [])
            if c.get("system") != f"urn:openehr:archetype:{archetype}"
        ),
        None,
    )
    if clinical is not None and clinical not in _CLINICAL_TO_QUALIFIER:
        raise MappingError(f"{what}: clinical status {clinical!r} has no problem_qualifier code")
    exact = _local_code_of(resource.get("verificationStatus"), archetype)  # the source's own certainty, if any
    certainty = exact if exact in rules.DIAGNOSTIC_CERTAINTY else None
    certainty = certainty or {"provisional": "at0074", "confirmed": "at0076"}.get(verification or "")
    if certainty and verification and rules.DIAGNOSTIC_CERTAINTY[certainty] != verification:
        raise MappingError(f"{what}: verification status {verification!r} contradicts certainty {certainty}")
    if verification is not None and certainty is None:
        raise MappingError(f"{what}: verification status {verification!r} has no diagnostic certainty code")
    severity = invert({k: v[0] for k, v in rules.CONDITION_SEVERITY.items()})
    severity_code = next(iter(codes_of(resource.get("severity"))), None)
    if severity_code is not None and severity_code not in severity:
        raise MappingError(f"{what}: severity {severity_code!r} is not mild/moderate/severe")
    qualifier = None
    if clinical:
        node, code, text = _CLINICAL_TO_QUALIFIER[clinical]
        qualifier = {
            "_type": "CLUSTER",
            "name": dv_text("Problem qualifier"),
            "archetype_node_id": _QUALIFIER,
            "archetype_details": {
                "_type": "ARCHETYPED",
                "archetype_id": {"_type": "ARCHETYPE_ID", "value": _QUALIFIER},
                "rm_version": "1.0.4",
            },
            "items": [element_node(node, "Status", dv_local(code, text))],
        }
    items = [
        element_node("at0002", "Problem/Diagnosis name", dv_coded(resource.get("code"), archetype, f"{what}: code")),
        *[
            element_node("at0012", "Body site", dv_coded(site, archetype, what))
            for site in resource.get("bodySite", [])
        ],
        element_node("at0077", "Date/time of onset", dv_date_time(resource["onsetDateTime"]))
        if resource.get("onsetDateTime")
        else None,
        element_node("at0030", "Date/time of resolution", dv_date_time(resource["abatementDateTime"]))
        if resource.get("abatementDateTime")
        else None,
        element_node(
            "at0005",
            "Severity",
            dv_local(severity[severity_code], rules.CONDITION_SEVERITY[severity[severity_code]][1]),
        )
        if severity_code
        else None,
        element_node("at0073", "Diagnostic certainty", dv_local(certainty, _CERTAINTY_TEXT[certainty]))
        if certainty
        else None,
        element_node("at0069", "Comment", dv_text(note)) if (note := one_note(resource)) else None,
        qualifier,
    ]
    for key in ("onsetPeriod", "onsetAge", "onsetString", "onsetRange", "abatementPeriod", "abatementString"):
        if key in resource:
            raise MappingError(f"{what}: {key} has no problem_diagnosis element (only date/times)")
    return entry_node("EVALUATION", archetype, "Problem/Diagnosis", data=item_tree("at0001", items))


# Procedure.status → the ISM state written (the forward table maps several states to one status).
_PROCEDURE_STATE = {
    "preparation": "526",
    "in-progress": "245",
    "on-hold": "530",
    "completed": "532",
    "stopped": "531",
    "not-done": "528",
}
assert all(rules.ISM_TO_PROCEDURE_STATUS[state] == status for status, state in _PROCEDURE_STATE.items())


def procedure_to_procedure_action(resource: dict[str, Any]) -> dict[str, Any]:
    """Procedure → ACTION.procedure.v1: status as the ISM current state, performed time as ACTION.time."""
    archetype, what = "openEHR-EHR-ACTION.procedure.v1", f"Procedure/{resource.get('id')}"
    state = _PROCEDURE_STATE.get(resource.get("status") or "")
    if state is None:
        raise MappingError(f"{what}: status {resource.get('status')!r} has no instruction state")
    performed = resource.get("performedDateTime")
    if state in rules.PERFORMED_STATES and not performed:
        raise MappingError(f"{what}: a {resource['status']} procedure needs performedDateTime (ACTION.time)")
    if "performedPeriod" in resource:
        raise MappingError(f"{what}: performedPeriod has no ACTION.procedure element (one time only)")
    items = [
        element_node("at0002", "Procedure name", dv_coded(resource.get("code"), archetype, f"{what}: code")),
        *[element_node("at0063", "Body site", dv_coded(s, archetype, what)) for s in resource.get("bodySite", [])],
        element_node("at0005", "Comment", dv_text(note)) if (note := one_note(resource)) else None,
    ]
    state_names = {
        "526": "planned",
        "245": "active",
        "530": "suspended",
        "532": "completed",
        "531": "aborted",
        "528": "cancelled",
    }
    return entry_node(
        "ACTION",
        archetype,
        "Procedure",
        time=dv_date_time(performed) if performed else None,
        description=item_tree("at0001", items),
        ism_transition={
            "_type": "ISM_TRANSITION",
            "current_state": {
                "_type": "DV_CODED_TEXT",
                "value": state_names[state],
                "defining_code": code_phrase("openehr", state),
            },
        },
    )


# Elements each type may carry on the way back; any other element would be lost, so it is refused.
# (id, meta, identifier, text and the patient/encounter references are the composition's own identity.)
_IDENTITY = {"resourceType", "id", "meta", "identifier", "text", "subject", "patient", "encounter"}
_SUPPORTED = {
    "Condition": {
        "clinicalStatus",
        "verificationStatus",
        "category",
        "severity",
        "code",
        "bodySite",
        "onsetDateTime",
        "abatementDateTime",
        "note",
    },
    "Procedure": {"status", "code", "bodySite", "performedDateTime", "note"},
    "MedicationRequest": {"status", "intent", "medicationCodeableConcept", "authoredOn", "dosageInstruction"},
    "vital": {"status", "category", "code", "effectiveDateTime", "valueQuantity", "component", "dataAbsentReason"},
    "lab": {
        "status",
        "category",
        "code",
        "issued",
        "effectiveDateTime",
        "valueQuantity",
        "valueCodeableConcept",
        "valueString",
        "dataAbsentReason",
        "interpretation",
        "referenceRange",
        "note",
    },
}


def _refuse_unsupported(resource: dict[str, Any], kind: str) -> None:
    extra = sorted(set(resource) - _IDENTITY - _SUPPORTED[kind])
    if extra:
        raise MappingError(f"{resource['resourceType']}/{resource.get('id')}: {extra} have no openEHR mapping")


def _entry_of(resource: dict[str, Any]) -> dict[str, Any]:
    kind = resource.get("resourceType")
    if kind in _SUPPORTED:
        _refuse_unsupported(resource, str(kind))
    if kind == "Condition":
        return condition_to_problem_diagnosis(resource)
    if kind == "Procedure":
        return procedure_to_procedure_action(resource)
    if kind == "MedicationRequest":
        return medication_request_to_medication_order(resource)
    if kind == "Observation":
        loinc = {
            c.get("code") for c in (resource.get("code") or {}).get("coding", []) if c.get("system") == rules.LOINC
        }
        vital = next((rules.VITAL_SIGN_BY_LOINC[c] for c in sorted(loinc) if c in rules.VITAL_SIGN_BY_LOINC), None)
        _refuse_unsupported(resource, "vital" if vital else "lab")
        return observation_to_vital_signs(resource, vital) if vital else observation_to_laboratory_result(resource)
    raise MappingError(f"{kind} has no openEHR mapping (Condition, Observation, MedicationRequest, Procedure)")


def dv_coded_phrase(text: str, terminology: str, code: str) -> dict[str, Any]:
    """A DV_CODED_TEXT from its text, terminology and code."""
    return {"_type": "DV_CODED_TEXT", "value": text, "defining_code": code_phrase(terminology, code)}


def resource_to_composition(resource: dict[str, Any], *, composer: str, recorded_at: str) -> dict[str, Any]:
    """One FHIR resource → one COMPOSITION holding its entry (template WRITEBACK_TEMPLATE).

    A Condition of the problem list goes into a persistent composition (category 431), everything
    else into an event composition (433) whose start time is the order's authoredOn, if any, else
    `recorded_at`: the forward mapping reads them back the same way.
    """
    entry = _entry_of(resource)
    categories = (
        codes_of((resource.get("category") or [{}])[0]) if resource.get("resourceType") == "Condition" else set()
    )
    persistent = "problem-list-item" in categories
    start = resource.get("authoredOn") or recorded_at
    if entry["_type"] == "ACTION" and not entry.get("time"):
        entry["time"] = dv_date_time(
            start
        )  # ACTION.time is mandatory; for a not-yet-performed procedure, when recorded
    entry = {k: v for k, v in entry.items() if v is not None}
    category = ("431", "persistent") if persistent else ("433", "event")
    archetype = "openEHR-EHR-COMPOSITION.problem_list.v2" if persistent else "openEHR-EHR-COMPOSITION.encounter.v1"
    return {
        "_type": "COMPOSITION",
        "name": dv_text("Problem list" if persistent else "Encounter"),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "template_id": {"_type": "TEMPLATE_ID", "value": WRITEBACK_TEMPLATE},
            "rm_version": "1.0.4",
        },
        "language": code_phrase("ISO_639-1", "en"),
        "territory": code_phrase("ISO_3166-1", "DE"),
        "category": {
            "_type": "DV_CODED_TEXT",
            "value": category[1],
            "defining_code": code_phrase("openehr", category[0]),
        },
        "composer": {"_type": "PARTY_IDENTIFIED", "name": composer},
        "context": {
            "_type": "EVENT_CONTEXT",
            "start_time": dv_date_time(start),
            "setting": {
                "_type": "DV_CODED_TEXT",
                "value": "other care",
                "defining_code": code_phrase("openehr", "238"),
            },
        },
        "content": [entry],
    }
