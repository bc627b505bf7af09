"""Builders of openEHR canonical-JSON nodes (data values, ELEMENTs, ENTRYs, structures) for the way back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...errors import MappingError
from .rm import COMPARATORS, TERMINOLOGY_SYSTEMS, UCUM

__all__ = [
    "cluster_node",
    "code_phrase",
    "codes_of",
    "dv_coded",
    "dv_date_time",
    "dv_local",
    "dv_quantity",
    "dv_text",
    "element_node",
    "entry_node",
    "history_node",
    "invert",
    "item_tree",
    "magnitude_status",
    "one_note",
    "terminology_of",
]

_SYSTEM_TO_TERMINOLOGY = {
    "http://loinc.org": "LOINC",
    "http://snomed.info/sct": "SNOMED-CT",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://fhir.de/CodeSystem/bfarm/icd-10-gm": "ICD-10-GM",
    UCUM: "UCUM",
    TERMINOLOGY_SYSTEMS["openehr"]: "openehr",
}


def invert(table: dict[str, Any]) -> dict[Any, str]:
    """First at-code per value: tables mapping two at-codes to one FHIR code write back the first."""
    inverse: dict[Any, str] = {}
    for code, value in table.items():
        inverse.setdefault(value, code)
    return inverse


def dv_text(value: str) -> dict[str, Any]:
    return {"_type": "DV_TEXT", "value": value}


def terminology_of(system: str | None, archetype: str) -> str:
    if not system:
        raise MappingError("a coding without a system cannot become an openEHR CODE_PHRASE")
    if system == f"urn:openehr:archetype:{archetype}":
        return "local"
    if system.startswith("urn:openehr:terminology:"):
        return system.removeprefix("urn:openehr:terminology:")
    return _SYSTEM_TO_TERMINOLOGY.get(system, system)


def code_phrase(terminology: str, code: str) -> dict[str, Any]:
    return {
        "_type": "CODE_PHRASE",
        "terminology_id": {"_type": "TERMINOLOGY_ID", "value": terminology},
        "code_string": code,
    }


def dv_coded(concept: dict[str, Any] | None, archetype: str, what: str) -> dict[str, Any]:
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
        return dv_text(text)
    first, *others = codings
    value: dict[str, Any] = {
        "_type": "DV_CODED_TEXT",
        "value": text,
        "defining_code": code_phrase(terminology_of(first.get("system"), archetype), first["code"]),
    }
    if others:
        value["mappings"] = [
            {
                "_type": "TERM_MAPPING",
                "match": "=",
                "target": code_phrase(terminology_of(c.get("system"), archetype), c["code"]),
            }
            for c in others
        ]
    return value


def dv_local(code: str, text: str) -> dict[str, Any]:
    return {"_type": "DV_CODED_TEXT", "value": text, "defining_code": code_phrase("local", code)}


def element_node(node_id: str, name: str, value: dict[str, Any] | None) -> dict[str, Any]:
    element: dict[str, Any] = {"_type": "ELEMENT", "name": dv_text(name), "archetype_node_id": node_id}
    if value is None:  # FHIR dataAbsentReason: openEHR's null flavour "unknown" (openehr 253)
        element["null_flavour"] = {
            "_type": "DV_CODED_TEXT",
            "value": "unknown",
            "defining_code": code_phrase("openehr", "253"),
        }
    else:
        element["value"] = value
    return element


def dv_date_time(value: str) -> dict[str, Any]:
    return {"_type": "DV_DATE_TIME", "value": value}


def magnitude_status(quantity: dict[str, Any], what: str) -> dict[str, Any]:
    """FHIR Quantity.comparator → DV_QUANTIFIED.magnitude_status (the inverse of rm.comparator), {} without one."""
    sign = quantity.get("comparator")
    if sign is None:
        return {}
    if sign not in COMPARATORS:
        raise MappingError(f"{what}: comparator {sign!r} has no DV_QUANTIFIED magnitude_status")
    return {"magnitude_status": sign}


def dv_quantity(quantity: dict[str, Any], what: str) -> dict[str, Any]:
    units = quantity.get("code") if quantity.get("system") == UCUM else quantity.get("unit")
    value = {"_type": "DV_QUANTITY", "magnitude": quantity["value"], "units": units or "1"}
    return value | magnitude_status(quantity, what)


def entry_node(kind: str, archetype: str, name: str, **body: Any) -> dict[str, Any]:
    return {
        "_type": kind,
        "name": dv_text(name),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "rm_version": "1.0.4",
        },
        "language": code_phrase("ISO_639-1", "en"),
        "encoding": code_phrase("IANA_character-sets", "UTF-8"),
        "subject": {"_type": "PARTY_SELF"},
        **body,
    }


def item_tree(node_id: str, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "_type": "ITEM_TREE",
        "name": dv_text("Tree"),
        "archetype_node_id": node_id,
        "items": [i for i in items if i is not None],
    }


def history_node(structure: tuple[str, str, str], time: str, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    history, event, tree = structure
    return {
        "_type": "HISTORY",
        "name": dv_text("History"),
        "archetype_node_id": history,
        "origin": dv_date_time(time),
        "events": [
            {
                "_type": "POINT_EVENT",
                "name": dv_text("Any event"),
                "archetype_node_id": event,
                "time": dv_date_time(time),
                "data": item_tree(tree, items),
            }
        ],
    }


def one_note(resource: dict[str, Any]) -> str | None:
    notes = [n.get("text") for n in resource.get("note") or []]
    if len(notes) > 1:
        raise MappingError(f"{resource['resourceType']}: {len(notes)} notes, the archetype holds one comment")
    return notes[0] if notes else None


def codes_of(concept: dict[str, Any] | None) -> set[str]:
    return {c.get("code") for c in (concept or {}).get("coding", [])}


def cluster_node(archetype: str, name: str, items: list[dict[str, Any] | None]) -> dict[str, Any]:
    return {
        "_type": "CLUSTER",
        "name": dv_text(name),
        "archetype_node_id": archetype,
        "archetype_details": {
            "_type": "ARCHETYPED",
            "archetype_id": {"_type": "ARCHETYPE_ID", "value": archetype},
            "rm_version": "1.0.4",
        },
        "items": [i for i in items if i is not None],
    }
