"""One mapper per archetype: an openEHR ENTRY → FHIR R4 resources (pure functions).

Each mapper is `(entry, ctx, path) → list[resource]`; `path` is the entry's stable path inside its
composition, from which every produced resource's id derives (see context.entry_source_id).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import MappingError
from . import rules
from .context import Context
from .rm import (
    coded_to_codeable,
    dv_to_value,
    element_value,
    elements,
    exact_magnitude,
    fhir_datetime,
    find_clusters,
    local_code,
    quantity,
    text_of,
)

__all__ = [
    "EntryMapper",
    "lab_test_result_to_report",
    "laboratory_test_result_to_report",
    "vital_signs_to_observation",
]

EntryMapper = Callable[[dict[str, Any], Context, str], list[dict[str, Any]]]

_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_DATA_ABSENT = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]}
# openehr_normal_statuses (HL7 table 0078) → v3 ObservationInterpretation. HHH is above the upper panic
# limit, HH above the upper alarm limit: both are v3 HH (critical high), never HU (significantly high, not
# critical), which would rank the most severe value below the next. Likewise LLL and LL → LL.
_NORMAL_STATUS = {"HHH": "HH", "HH": "HH", "H": "H", "N": "N", "L": "L", "LL": "LL", "LLL": "LL"}


def _category(code: str, display: str, system: str = _OBSERVATION_CATEGORY) -> list[dict[str, Any]]:
    return [{"coding": [{"system": system, "code": code, "display": display}]}]


def _archetype(entry: dict[str, Any]) -> str:
    return str(entry["archetype_node_id"])


def _time(value: dict[str, Any] | None, ctx: Context) -> str | None:
    return fhir_datetime(str(value["value"]), ctx.tz) if value and value.get("value") else None


def _events(entry: dict[str, Any]) -> list[dict[str, Any]]:
    events = (entry.get("data") or {}).get("events") or []
    if not events:
        raise MappingError(f"{_archetype(entry)}: OBSERVATION without events")
    for index, event in enumerate(events):
        if event.get("_type") == "INTERVAL_EVENT":
            # Its value is a math function (maximum, mean, change, …) over `width`, not a reading at `time`.
            # FHIR R4 Observation has no element for the function: as an effectivePeriod with the bare value
            # a change or a 24 h maximum would read as a measurement, so the entry is a problem instead.
            function = local_code(event.get("math_function")) or "none"
            raise MappingError(
                f"{_archetype(entry)}: event {index} is an INTERVAL_EVENT (math function openehr::{function}); "
                "FHIR R4 Observation has no element for the math function"
            )
    return list(events)


def _event_time(event: dict[str, Any], ctx: Context) -> str | None:
    return _time(event.get("time"), ctx)


def _concept(value: dict[str, Any] | None, archetype: str) -> dict[str, Any] | None:
    return coded_to_codeable(value, archetype)


def _notes(*texts: str | None) -> list[dict[str, str]]:
    return [{"text": text} for text in texts if text]


# --- vital signs ------------------------------------------------------------------------------


def vital_signs_to_observation(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """Vital-signs OBSERVATION (rules.VITAL_SIGNS) → one vital-signs-profile Observation per event."""
    archetype = _archetype(entry)
    rule = rules.VITAL_SIGNS[archetype]
    coding = [{"system": rules.LOINC, "code": rule.code, "display": rule.display}]
    if rule.code == "2708-6":  # the profile's SpO2 code, plus the pulse-oximetry one this archetype measures
        coding.append({"system": rules.LOINC, "code": "59408-5", "display": "Oxygen saturation by Pulse oximetry"})
    resources = []
    for index, event in enumerate(_events(entry)):
        data = event.get("data")
        values: dict[str, Any] = {}
        if rule.components:
            values["component"] = [
                {
                    "code": {"coding": [{"system": rules.LOINC, "code": code, "display": display}]},
                    **(dv_to_value(element_value(data, node), archetype, ctx.tz) or {"dataAbsentReason": _DATA_ABSENT}),
                }
                for node, code, display in rule.components
            ]
        else:
            values = dv_to_value(element_value(data, rule.value_node), archetype, ctx.tz)
            values = values or {"dataAbsentReason": _DATA_ABSENT}
        resources.append(
            ctx.resource(
                "Observation",
                f"{path}/data/events[{index}]",
                status="final",  # a committed openEHR measurement is a final recording (no status element)
                category=_category("vital-signs", "Vital Signs"),
                code={"coding": coding, "text": str(entry["name"]["value"])},
                subject=ctx.subject,
                encounter=ctx.encounter,
                effectiveDateTime=_event_time(event, ctx),
                **values,
            )
        )
    return resources


# --- laboratory ---------------------------------------------------------------------------------


def _reference_range(value: dict[str, Any] | None, archetype: str) -> list[dict[str, Any]]:
    interval = (value or {}).get("normal_range")
    if not isinstance(interval, dict):
        return []
    bounds = {}
    for side, key in (("lower", "low"), ("upper", "high")):
        limit = interval.get(side)
        if isinstance(limit, dict) and not interval.get(f"{side}_unbounded"):
            magnitude = exact_magnitude(limit, archetype, "normal_range limit")  # SimpleQuantity: no comparator
            bounds[key] = quantity(magnitude, str(limit.get("units", "")))
    return [bounds] if bounds else []


def _interpretation(value: dict[str, Any] | None) -> list[dict[str, Any]]:
    status = (value or {}).get("normal_status")
    code = _NORMAL_STATUS.get(str((status or {}).get("code_string")))
    return [{"coding": [{"system": _INTERPRETATION, "code": code}]}] if code else []


def _analyte_observation(
    ctx: Context, path: str, *, code: dict[str, Any] | None, value: dict[str, Any] | None, archetype: str, **extra: Any
) -> dict[str, Any]:
    if code is None:
        raise MappingError(f"{archetype}: analyte at {path} has no name (no code for the Observation)")
    fhir_value = dv_to_value(value, archetype, ctx.tz) or {"dataAbsentReason": _DATA_ABSENT}
    return ctx.resource(
        "Observation",
        path,
        status=extra.pop("status"),
        category=_category("laboratory", "Laboratory"),
        code=code,
        subject=ctx.subject,
        encounter=ctx.encounter,
        **fhir_value,
        interpretation=extra.pop("interpretation", None) or _interpretation(value),
        referenceRange=extra.pop("referenceRange", None) or _reference_range(value, archetype),
        **extra,
    )


def _observation_status(own: str | None, report: str) -> str:
    """An analyte's own status, else its report's; a withdrawn report (entered-in-error) withdraws every result,
    whatever status its analytes still carry: FHIR readers look at Observations without their report."""
    if report == "entered-in-error":
        return report
    return own or rules.REPORT_TO_OBSERVATION_STATUS.get(report, "unknown")


def _analyte_to_observation(
    cluster: dict[str, Any], ctx: Context, path: str, archetype: str, effective: str | None, report_status: str
) -> dict[str, Any]:
    """CLUSTER.laboratory_test_analyte.v1 → Observation (name, value, status, guidance/interpretation, comment)."""
    analyte = "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"
    status_code = local_code(element_value(cluster, "at0005"))
    if status_code is not None and status_code not in rules.ANALYTE_STATUS:
        raise MappingError(f"{analyte}: unknown result status {status_code} at {path}")
    guidance = element_value(cluster, "at0004")  # reference range guidance; coded = an interpretation
    coded_guidance = local_code(guidance) is not None and guidance is not None
    return _analyte_observation(
        ctx,
        path,
        code=_concept(element_value(cluster, "at0024"), analyte),
        value=element_value(cluster, "at0001"),
        archetype=analyte,
        status=_observation_status(rules.ANALYTE_STATUS.get(status_code or ""), report_status),
        effectiveDateTime=effective,
        issued=_issued(element_value(cluster, "at0006"), ctx),  # result status time: when this status was issued
        interpretation=[_concept(guidance, analyte)] if coded_guidance else None,
        referenceRange=[{"text": text_of(guidance)}] if guidance and not coded_guidance else None,
        note=_notes(text_of(element_value(cluster, "at0003"))),
    )


def _issued(value: dict[str, Any] | None, ctx: Context) -> str | None:
    """A DV_DATE_TIME as a FHIR instant (seconds and offset required), None when it is only a date."""
    text = _time(value, ctx)
    return text if text and len(text) > 16 else None


def _report_status(entry: dict[str, Any], data: Any) -> str:
    code = local_code(element_value(data, "at0073"))
    if code is None:
        return "unknown"  # the source does not say; never claim "final" on its behalf
    if code not in rules.LAB_OVERALL_STATUS:
        raise MappingError(f"{_archetype(entry)}: unknown overall test status {code}")
    return rules.LAB_OVERALL_STATUS[code]


def laboratory_test_result_to_report(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """OBSERVATION.laboratory_test_result.v1 → per event a DiagnosticReport and one Observation per analyte."""
    archetype = _archetype(entry)
    resources: list[dict[str, Any]] = []
    for index, event in enumerate(_events(entry)):
        event_path, data, effective = f"{path}/data/events[{index}]", event.get("data"), _event_time(event, ctx)
        status = _report_status(entry, data)
        analytes = list(find_clusters(data, "openEHR-EHR-CLUSTER.laboratory_test_analyte.v1"))
        observations = [
            _analyte_to_observation(
                cluster,
                ctx,
                f"{event_path}/analyte[{n}]",
                archetype,
                effective,
                status,
            )
            for n, cluster in enumerate(analytes)
        ]
        code = _concept(element_value(data, "at0005"), archetype)
        if code is None:
            raise MappingError(f"{archetype}: event {index} has no test name (at0005)")
        conclusion = text_of(element_value(data, "at0057"))
        resources.append(_lab_report(ctx, event_path, status, code, effective, observations, conclusion))
        resources += observations
    return resources


def _lab_report(
    ctx: Context,
    event_path: str,
    status: str,
    code: dict[str, Any],
    effective: str | None,
    observations: list[dict[str, Any]],
    conclusion: str | None = None,
) -> dict[str, Any]:
    """The DiagnosticReport of one lab event of either lab archetype, over its Observations."""
    return ctx.resource(
        "DiagnosticReport",
        event_path,
        status=status,
        category=_category("LAB", "Laboratory", "http://terminology.hl7.org/CodeSystem/v2-0074"),
        code=code,
        subject=ctx.subject,
        encounter=ctx.encounter,
        effectiveDateTime=effective,
        result=[{"reference": f"Observation/{o['id']}"} for o in observations],
        conclusion=conclusion,
    )


def lab_test_result_to_report(entry: dict[str, Any], ctx: Context, path: str) -> list[dict[str, Any]]:
    """OBSERVATION.lab_test-result.v1 (older lab archetype) → DiagnosticReport + one Observation per result group."""
    archetype = _archetype(entry)
    resources: list[dict[str, Any]] = []
    for index, event in enumerate(_events(entry)):
        event_path, data, effective = f"{path}/data/events[{index}]", event.get("data"), _event_time(event, ctx)
        status = _report_status(entry, data)
        observations = []
        for n, group in enumerate(elements(data, "at0096")):  # Result group / analyte cluster, named by its code
            value = element_value(group, "at0112")
            observations.append(
                _analyte_observation(
                    ctx,
                    f"{event_path}/result[{n}]",
                    code=_concept(group.get("name"), archetype),
                    value=value,
                    archetype=archetype,
                    status=_observation_status(None, status),
                    effectiveDateTime=effective,
                    issued=_time(element_value(group, "at0111"), ctx),
                )
            )
        code = _concept(element_value(data, "at0005"), archetype)
        if code is None:
            raise MappingError(f"{archetype}: event {index} has no test result name (at0005)")
        resources.append(_lab_report(ctx, event_path, status, code, effective, observations))
        resources += observations
    return resources
