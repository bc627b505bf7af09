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
from collections.abc import Sequence
from typing import Any

from ...errors import MappingError
from ...ids import CDRSYNC_NAMESPACE
from . import rules
from .rm import TERMINOLOGY_SYSTEMS, UCUM

__all__ = ["WRITEBACK_TEMPLATE", "resource_to_composition", "writeback_uid"]

WRITEBACK_TEMPLATE = "cdrsync.writeback.v1"
_SYSTEM_TO_TERMINOLOGY = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED-CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://fhir.de/CodeSystem/bfarm/icd-10-gm": "ICD-10-GM",
    UCUM: "UCUM",
    TERMINOLOGY_SYSTEMS["openehr"]: "openehr",
}


def _invert(table: dict[str, Any]) -> dict[Any, str]:
    """First at-code per value: tables mapping two at-codes to one FHIR code write back the first."""
    inverse: dict[Any, str] = {}
    for code, value in table.items():
        inverse.setdefault(value, code)
    return inverse


def writeback_uid(resource_type: str, resource_id: str) -> str:
    """The versioned-object uid of the composition a FHIR resource is written to: stable per resource."""
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, f"openehr-writeback|{resource_type}|{resource_id}"))


def _text(value: str) -> dict[str, Any]:
    return {"_type": "DV_TEXT", "value": value}


def _terminology(system: str | None, archetype: str) -> str:
    if not system:
        raise MappingError("a coding without a system cannot become an openEHR CODE_PHRASE")
    if system == f"urn:openehr:archetype:{archetype}":
        return "local"
    if system.startswith("urn:openehr:terminology:"):
        return system.removeprefix("urn:openehr:terminology:")
    return _SYSTEM_TO_TERMINOLOGY.get(system, system)


def _phrase(terminology: str, code: str) -> dict[str, Any]:
    return {
        "_type": "CODE_PHRASE",
        "terminology_id": {"_type": "TERMINOLOGY_ID", "value": terminology},
        "code_string": code,
    }


def _coded_or_text(concept: dict[str, Any] | None, archetype: str, what: str) -> dict[str, Any]:
    """CodeableConcept → DV_CODED_TEXT (first coding; further codings as TERM_MAPPINGs), or DV_TEXT."""
    if not concept:
        raise MappingError(f"{what} is missing")
    codings = concept.get("coding") or []
    text = (
        concept.get("text")
        or (codings[0].get("display") if codings else None)
        or (codings[0].get("code") if codings else None)
    )
    if not text:
        raise MappingError(f"{what} has neither text nor a coding")
    if not codings:
        return _text(text)
    first, *others = codings
    value: dict[str, Any] = {
        "_type": "DV_CODED_TEXT",
        "value": text,
        "defining_code": _phrase(_terminology(first.get("system"), archetype), first["code"]),
    }
    if others:
        value["mappings"] = [
            {
                "_type": "TERM_MAPPING",
                "match": "=",
                "target": _phrase(_terminology(c.get("system"), archetype), c["code"]),
            }
            for c in others
        ]
    return value


def _local(code: str, text: str) -> dict[str, Any]:
    return {"_type": "DV_CODED_TEXT", "value": text, "defining_code": _phrase("local", code)}


def _element(node_id: str, name: str, value: dict[str, Any] | None) -> dict[str, Any]:
    element: dict[str, Any] = {"_type": "ELEMENT", "name": _text(name), "archetype_node_id": node_id}
    if value is None:  # FHIR dataAbsentReason: openEHR's null flavour "unknown" (openehr 253)
        element["null_flavour"] = {
            "_type": "DV_CODED_TEXT",
            "value": "unknown",
            "defining_code": _phrase("openehr", "253"),
        }
    else:
        element["value"] = value
    return element


def _dt(value: str) -> dict[str, Any]:
    return {"_type": "DV_DATE_TIME", "value": value}


def _quantity(quantity: dict[str, Any], what: str) -> dict[str, Any]:
    if "comparator" in quantity:
        raise MappingError(f"{what}: a comparator ({quantity['comparator']}) has no place in DV_QUANTITY")
    units = quantity.get("code") if quantity.get("system") == UCUM else quantity.get("unit")
    return {"_type": "DV_QUANTITY", "magnitude": quantity["value"], "units": units or "1"}


def _entry(kind: str, archetype: str, name: str, **body: Any) -> dict[str, Any]:
    return {
        "_type": kind,
        "name": _text(name),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "rm_version": "1.0.4",
        },
        "language": _phrase("ISO_639-1", "en"),
        "encoding": _phrase("IANA_character-sets", "UTF-8"),
        "subject": {"_type": "PARTY_SELF"},
        **body,
    }


def _tree(node_id: str, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "_type": "ITEM_TREE",
        "name": _text("Tree"),
        "archetype_node_id": node_id,
        "items": [i for i in items if i is not None],
    }


def _history(structure: tuple[str, str, str], time: str, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    history, event, tree = structure
    return {
        "_type": "HISTORY",
        "name": _text("History"),
        "archetype_node_id": history,
        "origin": _dt(time),
        "events": [
            {
                "_type": "POINT_EVENT",
                "name": _text("Any event"),
                "archetype_node_id": event,
                "time": _dt(time),
                "data": _tree(tree, items),
            }
        ],
    }


def _one_note(resource: dict[str, Any]) -> str | None:
    notes = [n.get("text") for n in resource.get("note") or []]
    if len(notes) > 1:
        raise MappingError(f"{resource['resourceType']}: {len(notes)} notes, the archetype holds one comment")
    return notes[0] if notes else None


def _codes(concept: dict[str, Any] | None) -> set[str]:
    return {c.get("code") for c in (concept or {}).get("coding", [])}


def _vital_value(resource: dict[str, Any], rule: rules.VitalSign, what: str) -> dict[str, Any] | None:
    if "dataAbsentReason" in resource:
        return None
    quantity = resource.get("valueQuantity")
    if quantity is None:
        raise MappingError(f"{what}: a vital sign needs valueQuantity or dataAbsentReason")
    if rule.code == "2708-6":  # pulse oximetry records SpO2 as a percent proportion
        return {"_type": "DV_PROPORTION", "numerator": quantity["value"], "denominator": 100.0, "type": 2}
    return _quantity(quantity, what)


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
            _element(node, display, _vital_value(by_code[code], rule, what) if code in by_code else None)
            for node, code, display in rule.components
        ]
    else:
        items = [_element(rule.value_node, rule.display, _vital_value(resource, rule, what))]
    name = (resource.get("code") or {}).get("text") or rule.display
    return _entry("OBSERVATION", archetype, name, data=_history(rule.structure, time, items))


_LAB = "openEHR-EHR-OBSERVATION.laboratory_test_result.v1"
_ANALYTE = "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"
_ANALYTE_STATUS_TEXT = {
    "at0015": "Registered",
    "at0017": "Preliminary",
    "at0018": "Final",
    "at0019": "Corrected",
    "at0020": "Amended",
    "at0023": "Cancelled",
}


_ANALYTE_STATE = {
    "registered": "at0015",
    "preliminary": "at0017",
    "final": "at0018",
    "corrected": "at0019",
    "amended": "at0020",
    "cancelled": "at0023",
}
assert all(rules.ANALYTE_STATUS[code] == status for status, code in _ANALYTE_STATE.items())


def _lab_value(resource: dict[str, Any], what: str) -> dict[str, Any] | None:
    if "valueQuantity" in resource:
        value = _quantity(resource["valueQuantity"], what)
        ranges = resource.get("referenceRange") or []
        if len(ranges) > 1:
            raise MappingError(f"{what}: {len(ranges)} reference ranges, DV_QUANTITY holds one normal range")
        if ranges and ("low" in ranges[0] or "high" in ranges[0]):
            value["normal_range"] = _interval(ranges[0], what)
        return value
    if "valueCodeableConcept" in resource:
        return _coded_or_text(resource["valueCodeableConcept"], _ANALYTE, what)
    if "valueString" in resource:
        return _text(resource["valueString"])
    if "dataAbsentReason" in resource:
        return None
    kinds = [k for k in resource if k.startswith("value")]
    raise MappingError(f"{what}: {kinds or 'no value'} has no laboratory analyte mapping")


_V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_TO_NORMAL_STATUS = {"HU": "HHH", "HH": "HH", "H": "H", "N": "N", "L": "L", "LL": "LL", "LU": "LLL"}


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
            interval[side] = _quantity(bounds[key], what)
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
    name = _coded_or_text(resource.get("code"), _ANALYTE, f"{what}: code")
    value = _lab_value(resource, what)
    # A high/low flag on a quantity is the quantity's own normal status, as it came.
    status_flag = _normal_status(interpretations[0]) if interpretations and value and "magnitude" in value else None
    if status_flag and value is not None:
        value["normal_status"] = _phrase("openehr_normal_statuses", status_flag)
        interpretations = []
    items = [
        _element("at0024", "Analyte name", name),
        _element("at0001", "Result value", value),
        _element("at0004", "Interpretation", _coded_or_text(interpretations[0], _ANALYTE, what))
        if interpretations
        else None,
        _element("at0005", "Result status", _local(status, _ANALYTE_STATUS_TEXT[status])) if status else None,
        _element("at0006", "Result status time", _dt(resource["issued"])) if resource.get("issued") else None,
        _element("at0003", "Comment", _text(note)) if (note := _one_note(resource)) else None,
    ]
    analyte = {
        "_type": "CLUSTER",
        "name": _text("Analyte result"),
        "archetype_node_id": _ANALYTE,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": _ANALYTE},
            "rm_version": "1.0.4",
        },
        "items": [i for i in items if i is not None],
    }
    test_name = _element("at0005", "Test name", name)
    return _entry(
        "OBSERVATION",
        _LAB,
        "Laboratory test result",
        data=_history(("at0001", "at0002", "at0003"), time, [test_name, analyte]),
    )


_QUALIFIER = "openEHR-EHR-CLUSTER.problem_qualifier.v1"
_CLINICAL_TO_QUALIFIER = {
    "active": ("at0003", "at0026", "Active"),
    "inactive": ("at0003", "at0027", "Inactive"),
    "resolved": ("at0083", "at0084", "Resolved"),
    "relapse": ("at0083", "at0097", "Relapsed"),
    "remission": ("at0089", "at0090", "In remission"),
}
_CERTAINTY_TEXT = {"at0074": "Suspected", "at0076": "Confirmed"}


def condition_to_problem_diagnosis(resource: dict[str, Any]) -> dict[str, Any]:
    """Condition → EVALUATION.problem_diagnosis.v1 (+ CLUSTER.problem_qualifier.v1 for the clinical status)."""
    archetype, what = "openEHR-EHR-EVALUATION.problem_diagnosis.v1", f"Condition/{resource.get('id')}"
    clinical = next(iter(_codes(resource.get("clinicalStatus"))), None)
    verification = next(iter(_codes(resource.get("verificationStatus"))), None)
    if clinical is not None and clinical not in _CLINICAL_TO_QUALIFIER:
        raise MappingError(f"{what}: clinical status {clinical!r} has no problem_qualifier code")
    certainty = {"provisional": "at0074", "confirmed": "at0076"}.get(verification or "")
    if verification is not None and certainty is None:
        raise MappingError(f"{what}: verification status {verification!r} has no diagnostic certainty code")
    severity = _invert({k: v[0] for k, v in rules.CONDITION_SEVERITY.items()})
    severity_code = next(iter(_codes(resource.get("severity"))), None)
    if severity_code is not None and severity_code not in severity:
        raise MappingError(f"{what}: severity {severity_code!r} is not mild/moderate/severe")
    qualifier = None
    if clinical:
        node, code, text = _CLINICAL_TO_QUALIFIER[clinical]
        qualifier = {
            "_type": "CLUSTER",
            "name": _text("Problem qualifier"),
            "archetype_node_id": _QUALIFIER,
            "archetype_details": {
                "_type": "ARCHETYPED",
                "archetype_id": {"_type": "ARCHETYPE_ID", "value": _QUALIFIER},
                "rm_version": "1.0.4",
            },
            "items": [_element(node, "Status", _local(code, text))],
        }
    items = [
        _element("at0002", "Problem/Diagnosis name", _coded_or_text(resource.get("code"), archetype, f"{what}: code")),
        *[
            _element("at0012", "Body site", _coded_or_text(site, archetype, what))
            for site in resource.get("bodySite", [])
        ],
        _element("at0077", "Date/time of onset", _dt(resource["onsetDateTime"]))
        if resource.get("onsetDateTime")
        else None,
        _element("at0030", "Date/time of resolution", _dt(resource["abatementDateTime"]))
        if resource.get("abatementDateTime")
        else None,
        _element(
            "at0005", "Severity", _local(severity[severity_code], rules.CONDITION_SEVERITY[severity[severity_code]][1])
        )
        if severity_code
        else None,
        _element("at0073", "Diagnostic certainty", _local(certainty, _CERTAINTY_TEXT[certainty]))
        if certainty
        else None,
        _element("at0069", "Comment", _text(note)) if (note := _one_note(resource)) else None,
        qualifier,
    ]
    for key in ("onsetPeriod", "onsetAge", "onsetString", "onsetRange", "abatementPeriod", "abatementString"):
        if key in resource:
            raise MappingError(f"{what}: {key} has no problem_diagnosis element (only date/times)")
    return _entry("EVALUATION", archetype, "Problem/Diagnosis", data=_tree("at0001", items))


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
        _element("at0002", "Procedure name", _coded_or_text(resource.get("code"), archetype, f"{what}: code")),
        *[_element("at0063", "Body site", _coded_or_text(s, archetype, what)) for s in resource.get("bodySite", [])],
        _element("at0005", "Comment", _text(note)) if (note := _one_note(resource)) else None,
    ]
    state_names = {
        "526": "planned",
        "245": "active",
        "530": "suspended",
        "532": "completed",
        "531": "aborted",
        "528": "cancelled",
    }
    return _entry(
        "ACTION",
        archetype,
        "Procedure",
        time=_dt(performed) if performed else None,
        description=_tree("at0001", items),
        ism_transition={
            "_type": "ISM_TRANSITION",
            "current_state": {
                "_type": "DV_CODED_TEXT",
                "value": state_names[state],
                "defining_code": _phrase("openehr", state),
            },
        },
    )


_MEDICATION_ORDER = "openEHR-EHR-INSTRUCTION.medication_order.v3"


def _archetyped_cluster(archetype: str, name: str, items: list[dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "_type": "CLUSTER",
        "name": _text(name),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "rm_version": "1.0.4",
        },
        "items": [i for i in items if i is not None],
    }


def _dosage_items(dosage: dict[str, Any], what: str) -> list[dict[str, Any] | None]:
    """One Dosage → directions (at0009), route (at0091), dose (CLUSTER.dosage.v1), order start/stop (at0113)."""
    known = {"text", "route", "doseAndRate", "timing"}
    if set(dosage) - known:
        raise MappingError(f"{what}: dosage elements {sorted(set(dosage) - known)} have no medication_order mapping")
    repeat = (dosage.get("timing") or {}).get("repeat") or {}
    if set(dosage.get("timing") or {}) - {"repeat"} or set(repeat) - {
        "frequency",
        "period",
        "periodUnit",
        "boundsPeriod",
    }:
        raise MappingError(f"{what}: timing beyond frequency per day and bounds has no medication_order mapping")
    timing = None
    if "frequency" in repeat:
        if (repeat.get("period"), repeat.get("periodUnit")) != (1, "d"):
            raise MappingError(f"{what}: frequency per {repeat.get('period')} {repeat.get('periodUnit')}; only per day")
        timing = _archetyped_cluster(
            "openEHR-EHR-CLUSTER.timing_daily.v1",
            "Timing - daily",
            [
                _element(
                    "at0003", "Frequency", {"_type": "DV_QUANTITY", "magnitude": repeat["frequency"], "units": "1/d"}
                )
            ],
        )
    dose = None
    rates = dosage.get("doseAndRate") or []
    if len(rates) > 1 or any(set(r) - {"doseQuantity"} for r in rates):
        raise MappingError(f"{what}: only one doseQuantity per dosage maps to CLUSTER.dosage.v1")
    if rates or timing:
        quantity = rates[0]["doseQuantity"] if rates else None
        dose = _archetyped_cluster(
            "openEHR-EHR-CLUSTER.dosage.v1",
            "Dosage",
            [
                _element(
                    "at0144", "Dose amount", {"_type": "DV_QUANTITY", "magnitude": quantity["value"], "units": "1"}
                )
                if quantity
                else None,
                _element("at0145", "Dose unit", _text(quantity["unit"])) if quantity and quantity.get("unit") else None,
                timing,
            ],
        )
    bounds = repeat.get("boundsPeriod") or {}
    order = (
        {
            "_type": "CLUSTER",
            "name": _text("Order details"),
            "archetype_node_id": "at0113",
            "items": [
                _element(node, name, _dt(bounds[key]))
                for node, name, key in (
                    ("at0012", "Order start date/time", "start"),
                    ("at0013", "Order stop date/time", "end"),
                )
                if bounds.get(key)
            ],
        }
        if bounds
        else None
    )
    return [
        _element("at0009", "Overall directions description", _text(dosage["text"])) if dosage.get("text") else None,
        _element("at0091", "Route", _coded_or_text(dosage["route"], _MEDICATION_ORDER, what))
        if dosage.get("route")
        else None,
        dose,
        order,
    ]


def medication_request_to_medication_order(resource: dict[str, Any]) -> dict[str, Any]:
    """MedicationRequest (active order) → INSTRUCTION.medication_order.v3 with one activity."""
    what = f"MedicationRequest/{resource.get('id')}"
    if (resource.get("status"), resource.get("intent")) != ("active", "order"):
        raise MappingError(
            f"{what}: status {resource.get('status')!r}/intent {resource.get('intent')!r}; an openEHR medication "
            "order INSTRUCTION states an active order (its progress lives in ACTIONs)"
        )
    dosages = resource.get("dosageInstruction") or []
    if len(dosages) > 1:
        raise MappingError(f"{what}: {len(dosages)} dosages; one activity holds one")
    medication = _coded_or_text(resource.get("medicationCodeableConcept"), _MEDICATION_ORDER, f"{what}: medication")
    items = [_element("at0070", "Medication item", medication), *(_dosage_items(dosages[0], what) if dosages else [])]
    activity = {
        "_type": "ACTIVITY",
        "name": _text("Order"),
        "archetype_node_id": "at0001",
        "description": _tree("at0002", items),
        "timing": {"_type": "DV_PARSABLE", "value": "R1", "formalism": "timing"},
        "action_archetype_id": "openEHR-EHR-ACTION\\.medication\\.v1",
    }
    return _entry(
        "INSTRUCTION",
        _MEDICATION_ORDER,
        "Medication order",
        narrative=_text(medication["value"]),
        activities=[activity],
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


def resource_to_composition(resource: dict[str, Any], *, composer: str, recorded_at: str) -> dict[str, Any]:
    """One FHIR resource → one COMPOSITION holding its entry (template WRITEBACK_TEMPLATE).

    A Condition of the problem list goes into a persistent composition (category 431), everything
    else into an event composition (433) whose start time is the order's authoredOn, if any, else
    `recorded_at`: the forward mapping reads them back the same way.
    """
    entry = _entry_of(resource)
    categories = _codes((resource.get("category") or [{}])[0]) if resource.get("resourceType") == "Condition" else set()
    persistent = "problem-list-item" in categories
    start = resource.get("authoredOn") or recorded_at
    if entry["_type"] == "ACTION" and not entry.get("time"):
        entry["time"] = _dt(start)  # ACTION.time is mandatory; for a not-yet-performed procedure, when recorded
    entry = {k: v for k, v in entry.items() if v is not None}
    category = ("431", "persistent") if persistent else ("433", "event")
    archetype = "openEHR-EHR-COMPOSITION.problem_list.v2" if persistent else "openEHR-EHR-COMPOSITION.encounter.v1"
    return {
        "_type": "COMPOSITION",
        "name": _text("Problem list" if persistent else "Encounter"),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "template_id": {"_type": "TEMPLATE_ID", "value": WRITEBACK_TEMPLATE},
            "rm_version": "1.0.4",
        },
        "language": _phrase("ISO_639-1", "en"),
        "territory": _phrase("ISO_3166-1", "DE"),
        "category": {"_type": "DV_CODED_TEXT", "value": category[1], "defining_code": _phrase("openehr", category[0])},
        "composer": {"_type": "PARTY_IDENTIFIED", "name": composer},
        "context": {
            "_type": "EVENT_CONTEXT",
            "start_time": _dt(start),
            "setting": {"_type": "DV_CODED_TEXT", "value": "other care", "defining_code": _phrase("openehr", "238")},
        },
        "content": [entry],
    }
