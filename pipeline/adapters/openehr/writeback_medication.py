"""The way back for MedicationRequest: an active order → INSTRUCTION.medication_order.v3 (one activity)."""

from __future__ import annotations

from typing import Any

from ...errors import MappingError
from .rm_build import cluster_node, dv_coded, dv_date_time, dv_text, element_node, entry_node, invert, item_tree
from .rules import FREQUENCY_UNITS

__all__ = ["medication_request_to_medication_order"]

_MEDICATION_ORDER = "openEHR-EHR-INSTRUCTION.medication_order.v3"
_FREQUENCY_UNITS = invert(FREQUENCY_UNITS)  # Timing.repeat.periodUnit → timing_daily.v1 frequency units


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
        units = _FREQUENCY_UNITS.get(repeat.get("periodUnit", "")) if repeat.get("period") == 1 else None
        if units is None:
            raise MappingError(
                f"{what}: frequency per {repeat.get('period')} {repeat.get('periodUnit')}; "
                "only per 1 d, h, min or s (timing_daily.v1)"
            )
        timing = cluster_node(
            "openEHR-EHR-CLUSTER.timing_daily.v1",
            "Timing - daily",
            [
                element_node(
                    "at0003", "Frequency", {"_type": "DV_QUANTITY", "magnitude": repeat["frequency"], "units": units}
                )
            ],
        )
    dose = None
    rates = dosage.get("doseAndRate") or []
    if len(rates) > 1 or any(set(r) - {"doseQuantity"} for r in rates):
        raise MappingError(f"{what}: only one doseQuantity per dosage maps to CLUSTER.dosage.v1")
    if rates or timing:
        quantity = rates[0]["doseQuantity"] if rates else None
        dose = cluster_node(
            "openEHR-EHR-CLUSTER.dosage.v1",
            "Dosage",
            [
                element_node(
                    "at0144", "Dose amount", {"_type": "DV_QUANTITY", "magnitude": quantity["value"], "units": "1"}
                )
                if quantity
                else None,
                element_node("at0145", "Dose unit", dv_text(quantity["unit"]))
                if quantity and quantity.get("unit")
                else None,
                timing,
            ],
        )
    bounds = repeat.get("boundsPeriod") or {}
    order = (
        {
            "_type": "CLUSTER",
            "name": dv_text("Order details"),
            "archetype_node_id": "at0113",
            "items": [
                element_node(node, name, dv_date_time(bounds[key]))
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
        element_node("at0009", "Overall directions description", dv_text(dosage["text"]))
        if dosage.get("text")
        else None,
        element_node("at0091", "Route", dv_coded(dosage["route"], _MEDICATION_ORDER, what))
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
    medication = dv_coded(resource.get("medicationCodeableConcept"), _MEDICATION_ORDER, f"{what}: medication")
    items = [
        element_node("at0070", "Medication item", medication),
        *(_dosage_items(dosages[0], what) if dosages else []),
    ]
    activity = {
        "_type": "ACTIVITY",
        "name": dv_text("Order"),
        "archetype_node_id": "at0001",
        "description": item_tree("at0002", items),
        "timing": {"_type": "DV_PARSABLE", "value": "R1", "formalism": "timing"},
        "action_archetype_id": "openEHR-EHR-ACTION\\.medication\\.v1",
    }
    return entry_node(
        "INSTRUCTION",
        _MEDICATION_ORDER,
        "Medication order",
        narrative=dv_text(medication["value"]),
        activities=[activity],
    )
