"""openEHR reference-model helpers: navigate canonical JSON, turn data values into FHIR data types.

Canonical JSON (openEHR ITS-JSON) nodes carry `_type` and `archetype_node_id`; an ELEMENT's `value`
is a DV_* data value. These helpers are pure and know nothing about archetypes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from ...errors import MappingError, shape

__all__ = [
    "COMPARATORS",
    "TERMINOLOGY_SYSTEMS",
    "UCUM",
    "coded_to_codeable",
    "comparator",
    "dv_to_value",
    "element",
    "element_value",
    "elements",
    "exact_magnitude",
    "fhir_datetime",
    "find_clusters",
    "quantity",
    "terminology_system",
    "text_of",
]

UCUM = "http://unitsofmeasure.org"

# openEHR terminology ids → FHIR code systems (the ones these sources use).
TERMINOLOGY_SYSTEMS = {
    "LOINC": "http://loinc.org",
    "SNOMED-CT": "http://snomed.info/sct",
    "SNOMED CT": "http://snomed.info/sct",
    "SNOMED": "http://snomed.info/sct",
    "SCT": "http://snomed.info/sct",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "ICD-10": "http://hl7.org/fhir/sid/icd-10",
    "ICD-10-GM": "http://fhir.de/CodeSystem/bfarm/icd-10-gm",
    "UCUM": UCUM,
    "openehr": "http://openehr.org/id/openehr-terminology",
}

# openEHR units written in a non-UCUM form by some templates → the UCUM code.
_UNIT_FIXES = {"°C": "Cel", "°F": "[degF]", "mmHg": "mm[Hg]", "bpm": "/min", "beats/min": "/min"}
# Units the sources send that are valid UCUM; anything else keeps its text but gets no UCUM code.
_KNOWN_UCUM = frozenset(
    {
        "kg",
        "g",
        "mg",
        "cm",
        "m",
        "mm",
        "mm[Hg]",
        "/min",
        "Cel",
        "[degF]",
        "%",
        "kg/m2",
        "mg/dL",
        "g/dL",
        "g/L",
        "mmol/L",
        "umol/L",
        "1/d",
        "1/wk",
        "1/h",
        "1",
        "10*9/L",
        "10*12/L",
        "/uL",
        "L",
        "mL",
        "h",
        "min",
        "s",
        "d",
        "wk",
        "mo",
        "a",
        "fL",
        "pg",
        "U/L",
        "[iU]/L",
        "ng/mL",
    }
)


def terminology_system(terminology_id: str, archetype_id: str) -> str:
    """A FHIR system for an openEHR terminology id; `local` codes are only meaningful in their archetype."""
    if terminology_id == "local":
        return f"urn:openehr:archetype:{archetype_id}"
    if re.match(r"^[a-z][a-z0-9+.-]*:", terminology_id):  # already a URI (http://…, urn:…)
        return terminology_id
    return TERMINOLOGY_SYSTEMS.get(terminology_id, f"urn:openehr:terminology:{terminology_id}")


def _archetype_of(node: dict[str, Any]) -> str:
    return str(node.get("archetype_node_id", ""))


def children(node: Any) -> Iterator[dict[str, Any]]:
    """Direct structural children of a node (items, events, data, description, …)."""
    if not isinstance(node, dict):
        return
    for key in ("items", "events", "data", "state", "protocol", "description", "activities", "other_context"):
        value = node.get(key)
        if isinstance(value, list):
            yield from (v for v in value if isinstance(v, dict))
        elif isinstance(value, dict):
            yield value


def elements(node: Any, node_id: str) -> Iterator[dict[str, Any]]:
    """Every ELEMENT (or CLUSTER) below `node` with this archetype node id, not crossing into other archetypes."""
    for child in children(node):
        if child.get("archetype_node_id") == node_id:
            yield child
        if not _archetype_of(child).startswith("openEHR-"):
            yield from elements(child, node_id)


def element(node: Any, node_id: str) -> dict[str, Any] | None:
    """The first node below `node` with this archetype node id, or None."""
    return next(elements(node, node_id), None)


def element_value(node: Any, node_id: str) -> dict[str, Any] | None:
    """The data value of the first ELEMENT with this node id (None if absent or null-flavoured)."""
    found = element(node, node_id)
    value = found.get("value") if found else None
    return value if isinstance(value, dict) else None


def find_clusters(node: Any, archetype_id: str) -> Iterator[dict[str, Any]]:
    """Archetyped CLUSTERs below `node` (any depth, slots in slots included), in document order."""
    for child in children(node):
        if _archetype_of(child) == archetype_id:
            yield child
        yield from find_clusters(child, archetype_id)


def text_of(value: dict[str, Any] | None) -> str | None:
    """The text of a DV_TEXT/DV_CODED_TEXT (None otherwise)."""
    if value and value.get("_type") in ("DV_TEXT", "DV_CODED_TEXT"):
        return str(value.get("value"))
    return None


def coded_to_codeable(value: dict[str, Any] | None, archetype_id: str) -> dict[str, Any] | None:
    """DV_CODED_TEXT → CodeableConcept (coding + text); DV_TEXT → CodeableConcept.text only."""
    if not value or value.get("_type") not in ("DV_TEXT", "DV_CODED_TEXT"):
        return None
    concept: dict[str, Any] = {"text": str(value["value"])}
    code = value.get("defining_code")
    if value["_type"] == "DV_CODED_TEXT" and isinstance(code, dict):
        system = terminology_system(code["terminology_id"]["value"], archetype_id)
        concept["coding"] = [{"system": system, "code": code["code_string"], "display": str(value["value"])}]
        # TERM_MAPPINGs carry the same concept in other terminologies: further codings.
        for mapping in value.get("mappings") or []:
            target = mapping.get("target") or {}
            if target.get("code_string"):
                concept["coding"].append(
                    {
                        "system": terminology_system(target["terminology_id"]["value"], archetype_id),
                        "code": target["code_string"],
                    }
                )
    return concept


def local_code(value: dict[str, Any] | None) -> str | None:
    """The code_string of a DV_CODED_TEXT (e.g. an archetype at-code), None for anything else."""
    if value and value.get("_type") == "DV_CODED_TEXT":
        return str(value["defining_code"]["code_string"])
    return None


def quantity(magnitude: float | int, units: str) -> dict[str, Any]:
    """A FHIR Quantity; UCUM system and code only when the unit is (or is fixed to) valid UCUM."""
    code = _UNIT_FIXES.get(units, units)
    result: dict[str, Any] = {"value": magnitude, "unit": units}
    if code in _KNOWN_UCUM:
        result.update(system=UCUM, code=code)
    return result


# DV_QUANTIFIED.magnitude_status → FHIR R4 Quantity.comparator. '=' (or none) is a point value. '~'
# (approximately) has no R4 comparator: stated as exact it would be a wrong result, so it is a MappingError.
_COMPARATORS = {"=": None, "<": "<", "<=": "<=", ">=": ">=", ">": ">"}
#: The comparators FHIR R4 and openEHR share (write-back maps them back one to one, rm_build.magnitude_status).
COMPARATORS = frozenset(sign for sign in _COMPARATORS.values() if sign)


def comparator(value: dict[str, Any], archetype_id: str) -> str | None:
    """The FHIR comparator of a DV_QUANTIFIED's magnitude_status (None for a point value)."""
    status = value.get("magnitude_status")
    if status is None:
        return None
    if status not in _COMPARATORS:
        meaning = "approximate, " if status == "~" else ""
        raise MappingError(
            f"{value.get('_type')} magnitude_status {shape(status, 4)} ({meaning}archetype {archetype_id}) "
            "has no FHIR R4 Quantity.comparator"
        )
    return _COMPARATORS[str(status)]


def exact_magnitude(value: dict[str, Any], archetype_id: str, what: str) -> Any:
    """The magnitude of a DV_QUANTIFIED where FHIR has no comparator (SimpleQuantity, integer, Ratio)."""
    if comparator(value, archetype_id) is not None:
        raise MappingError(f"{what} with magnitude_status (archetype {archetype_id}) has no FHIR comparator there")
    return value["magnitude"]


def fhir_datetime(value: str, tz: ZoneInfo) -> str:
    """openEHR ISO 8601 date/time → FHIR dateTime; a time without offset is read in the site's zone
    (FHIR requires an offset once hours are given), the decimal comma becomes a point."""
    text = value.strip().replace(",", ".")
    if re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", text):
        return text
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MappingError(f"{shape(value)} is not an ISO 8601 date/time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed.isoformat()


def dv_to_value(value: dict[str, Any] | None, archetype_id: str, tz: ZoneInfo) -> dict[str, Any]:
    """A DV_* data value → the matching FHIR value[x] ({"valueQuantity": …}); empty when there is none."""
    if not value:
        return {}
    kind = value.get("_type")
    if kind == "DV_QUANTITY":
        result = quantity(value["magnitude"], str(value.get("units", "")))
        return {"valueQuantity": _with_comparator(result, comparator(value, archetype_id))}
    if kind == "DV_CODED_TEXT":
        return {"valueCodeableConcept": coded_to_codeable(value, archetype_id)}
    if kind == "DV_TEXT":
        return {"valueString": str(value["value"])}
    if kind == "DV_COUNT":
        return {"valueInteger": int(exact_magnitude(value, archetype_id, "DV_COUNT"))}
    if kind == "DV_BOOLEAN":
        return {"valueBoolean": bool(value["value"])}
    if kind in ("DV_DATE_TIME", "DV_DATE"):
        return {"valueDateTime": fhir_datetime(str(value["value"]), tz)}
    if kind == "DV_PROPORTION":
        return _proportion(value, comparator(value, archetype_id))
    if kind == "DV_ORDINAL":
        return {"valueCodeableConcept": coded_to_codeable(value.get("symbol"), archetype_id)}
    raise MappingError(f"data value type {kind} has no FHIR value mapping (archetype {archetype_id})")


def _with_comparator(result: dict[str, Any], sign: str | None) -> dict[str, Any]:
    return {**result, "comparator": sign} if sign else result


def _proportion(value: dict[str, Any], sign: str | None) -> dict[str, Any]:
    """DV_PROPORTION: percent (type 2) → Quantity in %, unitary (1) → plain number, others → Ratio."""
    numerator, denominator, kind = value["numerator"], value["denominator"], int(value.get("type", 0))
    if kind == 2:
        return {"valueQuantity": _with_comparator(quantity(numerator, "%"), sign)}
    if kind == 1:
        return {"valueQuantity": _with_comparator(quantity(numerator, "1"), sign)}
    if sign:
        raise MappingError("DV_PROPORTION ratio with magnitude_status has no FHIR comparator (Ratio has none)")
    return {"valueRatio": {"numerator": {"value": numerator}, "denominator": {"value": denominator}}}
