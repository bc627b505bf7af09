"""HL7 v2 data types → FHIR data types (CX, XPN, XAD, XTN, CWE, DTM), and deterministic source ids.

Code tables follow the HL7 v2-to-FHIR ConceptMaps (table 0001 → gender, 0203 → identifier type,
0396 coding systems → FHIR system URIs).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from ...ids import CDRSYNC_NAMESPACE
from .er7 import Rep, hl7_datetime

__all__ = [
    "CODING_SYSTEMS",
    "Hl7Context",
    "clean",
    "cwe_to_codeable",
    "cx_to_identifier",
    "hl7_source_id",
    "xad_to_address",
    "xcn_to_reference",
    "xpn_to_name",
    "xtn_to_telecom",
]

V2 = "http://terminology.hl7.org/CodeSystem/v2-"
UCUM = "http://unitsofmeasure.org"

# HL7 table 0396 (coding system) → FHIR system.
CODING_SYSTEMS = {
    "LN": "http://loinc.org",
    "LNC": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm",
    "I9M": "http://hl7.org/fhir/sid/icd-9-cm",
    "NDC": "http://hl7.org/fhir/sid/ndc",
    "CVX": "http://hl7.org/fhir/sid/cvx",
    "UCUM": UCUM,
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "C4": "http://www.ama-assn.org/go/cpt",
    "CDCREC": "urn:oid:2.16.840.1.113883.6.238",
    "ICDO": "http://terminology.hl7.org/CodeSystem/icd-o",
}


@dataclass(frozen=True)
class Hl7Context:
    """Site settings a mapper needs: its name, its zone, and identifier systems per assigning authority."""

    site: str
    tz: ZoneInfo
    identifier_systems: dict[str, str]

    def system_for(self, authority: str | None) -> str | None:
        """The identifier system of an assigning authority (site file), a site-scoped URN when unlisted."""
        if not authority:
            return None
        return self.identifier_systems.get(authority, f"urn:cdrsync:{self.site}:authority:{authority}")

    def when(self, value: str | None, field: str | None = None) -> str | None:
        """An HL7 DTM as a FHIR dateTime in this site's zone; a MappingError names `field` (e.g. "OBX-14")."""
        return hl7_datetime(value, self.tz, field)

    def day(self, value: str | None, field: str | None = None) -> str | None:
        """An HL7 DTM as a FHIR date (its date part, as written)."""
        full = hl7_datetime(value, self.tz, field)
        return full[:10] if full else None


def hl7_source_id(kind: str, *parts: str | None) -> str:
    """Deterministic source id (uuid5) of what an HL7 v2 element becomes, from its identifying fields."""
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, "|".join(["hl7v2", kind, *(p or "" for p in parts)])))


def coding_system(code: str | None) -> str | None:
    """FHIR system of an HL7 coding-system name; HL7 tables (HL7nnnn) to terminology.hl7.org."""
    if not code:
        return None
    if code.upper().startswith("HL7") and code[3:].isdigit():
        return f"{V2}{code[3:]}"
    if code in CODING_SYSTEMS:
        return CODING_SYSTEMS[code]
    if code.startswith(("http://", "https://", "urn:")):
        return code
    return f"urn:cdrsync:hl7v2:coding-system:{code}"


def cwe_to_codeable(rep: Rep | None) -> dict[str, Any] | None:
    """CWE/CE/CNE → CodeableConcept: primary (1-3) and alternate (4-6) codings, original text (9)."""
    if rep is None:
        return None
    codings = []
    for code_at, text_at, system_at in ((1, 2, 3), (4, 5, 6)):
        code = rep.c(code_at)
        if code:
            coding = {"system": coding_system(rep.c(system_at)), "code": code, "display": rep.c(text_at)}
            codings.append({k: v for k, v in coding.items() if v})
    text = rep.c(9) or rep.c(2)
    concept: dict[str, Any] = {}
    if codings:
        concept["coding"] = codings
    if text:
        concept["text"] = text
    return concept or None


_IDENTIFIER_TYPES = {"MR", "PI", "PT", "SS", "SB", "NI", "NH", "AN", "VN", "DL", "PPN", "PN", "EN", "MC", "MA", "JHN"}


def cx_to_identifier(rep: Rep, ctx: Hl7Context) -> dict[str, Any] | None:
    """CX → Identifier: value (1), system from the assigning authority (4.1 namespace, else 4.2 universal
    id) via the site file, type (5, table 0203), period (7, 8)."""
    value = rep.c(1)
    if not value:
        return None
    identifier: dict[str, Any] = {"value": value}
    system = ctx.system_for(rep.c(4, 1) or rep.c(4, 2))
    if system:
        identifier["system"] = system
    kind = rep.c(5)
    if kind:
        coding = {"system": f"{V2}0203", "code": kind} if kind in _IDENTIFIER_TYPES else None
        identifier["type"] = {"coding": [coding]} if coding else {"text": kind}
    period = {k: v for k, v in (("start", ctx.day(rep.c(7), "CX-7")), ("end", ctx.day(rep.c(8), "CX-8"))) if v}
    if period:
        identifier["period"] = period
    return identifier


_NAME_USE = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "anonymous", "B": "old"}


def xpn_to_name(rep: Rep) -> dict[str, Any] | None:
    """XPN → HumanName: family (1.1), given (2, 3), suffix (4, 6), prefix (5), use (7, table 0200)."""
    name: dict[str, Any] = {
        "family": rep.c(1, 1),
        "given": [g for g in (rep.c(2), rep.c(3)) if g],
        "suffix": [s for s in (rep.c(4), rep.c(6)) if s],
        "prefix": [p for p in (rep.c(5),) if p],
        "use": _NAME_USE.get(rep.c(7) or ""),
    }
    name = {k: v for k, v in name.items() if v}
    return name if name.get("family") or name.get("given") else None


def xad_to_address(rep: Rep) -> dict[str, Any] | None:
    """XAD → Address: lines (1: street address, its subcomponents joined; 2), city (3), state (4),
    postal code (5), country (6)."""
    street = " ".join(p for p in (rep.c(1, 1), rep.c(1, 2), rep.c(1, 3)) if p)
    address = {
        "line": [line for line in (street, rep.c(2)) if line],
        "city": rep.c(3),
        "state": rep.c(4),
        "postalCode": rep.c(5),
        "country": rep.c(6),
    }
    address = {k: v for k, v in address.items() if v}
    return address or None


_TELECOM_SYSTEM = {"PH": "phone", "FX": "fax", "Internet": "email", "X.400": "email", "BP": "pager", "CP": "phone"}
_TELECOM_USE = {"PRN": "home", "ORN": "home", "WPN": "work", "PRS": "mobile", "EMR": "home", "VHN": "home"}


def xtn_to_telecom(rep: Rep) -> dict[str, Any] | None:
    """XTN → ContactPoint: e-mail (4) or number (1, else 12, else 6+7), system (3), use (2)."""
    kind = rep.c(3) or ""
    if kind in ("Internet", "X.400"):
        value = rep.c(4)
    else:
        local = "".join(p for p in (rep.c(6), rep.c(7)) if p)
        value = rep.c(12) or rep.c(1) or local or None
    if not value:
        return None
    telecom = {"system": _TELECOM_SYSTEM.get(kind, "phone"), "value": value, "use": _TELECOM_USE.get(rep.c(2) or "")}
    return {k: v for k, v in telecom.items() if v}


def clean(body: dict[str, Any]) -> dict[str, Any]:
    """The element without empty values (FHIR forbids empty strings, arrays and objects)."""
    return {k: v for k, v in body.items() if v not in (None, [], {}, "")}


def xcn_to_reference(rep: Rep | None) -> dict[str, Any] | None:
    """XCN (a person) → a logical Reference: display name and the person's id as identifier."""
    if rep is None:
        return None
    name = " ".join(p for p in (rep.c(6), rep.c(3), rep.c(4), rep.c(2, 1)) if p)
    reference: dict[str, Any] = {"display": name} if name else {}
    if rep.c(1):
        reference["identifier"] = {"value": rep.c(1)}
    return reference or None
