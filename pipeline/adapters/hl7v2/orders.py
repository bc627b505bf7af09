"""Order and result segments → FHIR: OBX, OBR, ORC(+OBR), ORC(+RXE), TXA(+OBX). Pure functions."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

from ...errors import MappingError, shape
from .datatypes import UCUM, Hl7Context, clean, cwe_to_codeable, hl7_source_id, xcn_to_reference
from .er7 import Rep, Segment
from .segments import order_status, report_status
from .tables import DOCUMENT_AVAILABILITY, DOCUMENT_COMPLETION, INTERPRETATION, OBSERVATION_STATUS, PRIORITY

__all__ = [
    "continues_text",
    "document_status",
    "obr_to_diagnostic_report",
    "obx_to_attachment",
    "obx_to_observation",
    "orc_to_medication_request",
    "orc_to_service_request",
    "order_key",
    "report_scope",
    "txa_to_document_reference",
]

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")
_RANGE = re.compile(r"^\s*([+-]?\d+\.?\d*)\s*-\s*([+-]?\d+\.?\d*)\s*$")
_V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_DATA_ABSENT_EXTENSION = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
TEXT_TYPES = frozenset({"TX", "FT"})


def _number(text: str, where: str) -> int | float:
    if not _NUMBER.match(text.strip()):
        raise MappingError(f"{where}: {shape(text)} is not a number")
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def _unit(rep: Rep | None) -> dict[str, Any]:
    """OBX-6 / CWE units → Quantity unit fields; UCUM system only when the sender says UCUM."""
    if rep is None:
        return {}
    code, text, system = rep.c(1), rep.c(2), (rep.c(3) or "").upper()
    if system == "UCUM" and code:
        return clean({"unit": text or code, "system": UCUM, "code": code})
    return clean({"unit": text or code})


def _ei(rep: Rep | None) -> tuple[str, str] | None:
    """EI (entity identifier) → (namespace, id), None when empty."""
    if rep is None or not rep.c(1):
        return None
    return rep.c(2) or rep.c(3) or "", rep.c(1) or ""


def _values(segment: Segment, field: int) -> list[list[list[str]]]:
    return [rep.components for rep in segment.reps(field)]


def continues_text(first: Segment, line: Segment) -> bool:
    """True when OBX `line` is the next line of the TX/FT text `first` begins.

    Senders split a narrative (a pathology report) over consecutive OBX, one line each, with the same value
    type (OBX-2), identifier (OBX-3) and sub-id (OBX-4): one text. Units, range, flags, status and time
    (OBX-6, 7, 8, 11, 14) of a further line must be the first line's or empty, else it is a result of its own.
    """
    if first.get(2) not in TEXT_TYPES or not first.rep(3):  # lines without OBX-3 are each reported
        return False
    if any(_values(first, f) != _values(line, f) for f in (2, 3, 4)):
        return False
    return all(not line.reps(f) or _values(line, f) == _values(first, f) for f in (6, 7, 8, 11, 14))


def _text(segments: Sequence[Segment]) -> str:
    """The text of OBX lines: their OBX-5 repetitions, one line each; an empty OBX-5 is an empty line."""
    return "\n".join("\n".join(r.c(1) or "" for r in s.reps(5)) for s in segments).strip("\n")


def _data_absent() -> dict[str, Any]:
    return {
        "dataAbsentReason": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]
        }
    }


def _observation_value(obx: Segment, where: str, ctx: Hl7Context, lines: Sequence[Segment] = ()) -> dict[str, Any]:
    """OBX-5 by its type OBX-2 → value[x]; a value FHIR cannot hold faithfully raises MappingError.
    `lines`: the further OBX of a text `obx` begins (continues_text)."""
    if lines:
        text = _text([obx, *lines])
        return {"valueString": text} if text else _data_absent()
    kind, reps = obx.get(2) or "", obx.reps(5)
    if not reps:
        return _data_absent()
    if kind in ("ST", "TX", "FT"):
        return {"valueString": "\n".join(r.c(1) or "" for r in reps)}
    if len(reps) > 1:
        raise MappingError(f"{where}: OBX-5 of type {kind} repeats ({len(reps)} values); an Observation holds one")
    rep = reps[0]
    if kind == "NM":
        return {"valueQuantity": {"value": _number(rep.c(1) or "", where), **_unit(obx.rep(6))}}
    if kind == "SN":
        return _structured_numeric(rep, obx, where)
    if kind in ("CWE", "CE", "CNE", "CF"):
        return {"valueCodeableConcept": cwe_to_codeable(rep)}
    if kind in ("DT", "DTM", "TS"):
        return {"valueDateTime": ctx.when(rep.c(1), "OBX-5")}
    if kind == "TM":
        return {"valueTime": rep.c(1)}
    if kind == "RP":  # reference pointer: the address of the result, kept as text
        return {"valueString": rep.c(1)}
    raise MappingError(f"{where}: OBX-2 value type {kind!r} has no Observation value mapping")


def _structured_numeric(rep: Rep, obx: Segment, where: str) -> dict[str, Any]:
    """SN: comparator (1), number (2), separator (3), second number (4) → Quantity, Range or Ratio."""
    comparator, first, separator, second = rep.c(1), rep.c(2), rep.c(3), rep.c(4)
    unit = _unit(obx.rep(6))
    if first is None:
        raise MappingError(f"{where}: SN without a number")
    if separator is None:
        quantity = {"value": _number(first, where), **unit}
        if comparator in ("<", "<=", ">=", ">"):
            quantity["comparator"] = comparator
        elif comparator not in (None, "="):
            raise MappingError(f"{where}: SN comparator {comparator!r}")
        return {"valueQuantity": quantity}
    if second is None:
        raise MappingError(f"{where}: SN separator {separator!r} without a second number")
    if separator == "-":
        return {
            "valueRange": {
                "low": {"value": _number(first, where), **unit},
                "high": {"value": _number(second, where), **unit},
            }
        }
    if separator in (":", "/"):
        return {
            "valueRatio": {
                "numerator": {"value": _number(first, where)},
                "denominator": {"value": _number(second, where)},
            }
        }
    raise MappingError(f"{where}: SN separator {separator!r}")


def _reference_range(obx: Segment) -> list[dict[str, Any]]:
    text = obx.get(7)
    if not text:
        return []
    match = _RANGE.match(text)
    unit = _unit(obx.rep(6))
    if match:
        low, high = match.groups()
        return [
            {
                "low": {"value": _number(low, "OBX-7"), **unit},
                "high": {"value": _number(high, "OBX-7"), **unit},
                "text": text,
            }
        ]
    return [{"text": text}]


def _interpretation(obx: Segment) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for rep in obx.reps(8):
        flag = rep.c(1)
        if flag in INTERPRETATION:
            out.append({"coding": [{"system": _V3_INTERPRETATION, "code": flag}]})
        elif flag:
            out.append({"text": rep.c(2) or flag})
    return out


def obx_to_observation(
    obx: Segment,
    ctx: Hl7Context,
    patient_ref: str,
    *,
    scope: str,
    encounter_ref: str | None,
    default_time: str | None,
    category: str | None,
    where: str,
    lines: Sequence[Segment] = (),
) -> dict[str, Any]:
    """OBX → Observation: code (OBX-3), value (2, 5, 6), range (7), flags (8), status (11), time (14).

    `scope` is what the observation belongs to (its report, order or patient): with OBX-3 and the
    sub-id OBX-4 it makes the id, so a corrected result replaces the earlier one. `lines` are the further
    OBX of a text this one begins (continues_text): their OBX-5 join its value, one line each.
    """
    code = cwe_to_codeable(obx.rep(3))
    if code is None:
        raise MappingError(f"{where}: OBX-3 (observation identifier) is empty")
    status = OBSERVATION_STATUS.get(obx.get(11) or "", "unknown")
    first_code = (code.get("coding") or [{}])[0].get("code") or code.get("text")
    return clean(
        {
            "resourceType": "Observation",
            "id": hl7_source_id("Observation", scope, first_code, obx.get(4)),
            "status": status,
            "category": [
                {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}
            ]
            if category
            else [],
            "code": code,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "effectiveDateTime": ctx.when(obx.get(14), "OBX-14") or default_time,
            **_observation_value(obx, where, ctx, lines),
            "interpretation": _interpretation(obx),
            "referenceRange": _reference_range(obx),
        }
    )


def report_scope(obr: Segment, control_id: str, sender: str = "") -> str:
    """The identity of an OBR's report: filler order number (OBR-3), else placer (OBR-2), else the message.

    A number without its assigning authority (EI-2, EI-3) is the sender's (`sender`: MSH-3 and MSH-4, as
    HL7 v2 reads an EI without one): two applications of a hospital (a laboratory, a point-of-care system)
    each numbering from 1 would otherwise give two reports, perhaps of two patients, one id, and the later
    would overwrite the earlier.
    """
    key = _ei(obr.rep(3)) or _ei(obr.rep(2))
    if key and not key[0] and sender:
        key = (f"sender:{sender}", key[1])
    return "|".join(key) if key else f"{control_id}|OBR{obr.get(1) or ''}"


def obr_to_diagnostic_report(
    obr: Segment, ctx: Hl7Context, patient_ref: str, encounter_ref: str | None, scope: str, results: list[str]
) -> dict[str, Any]:
    """OBR → DiagnosticReport: code (OBR-4), effective (7), issued (22), status (25), results (its OBX)."""
    code = cwe_to_codeable(obr.rep(4))
    if code is None:
        raise MappingError("OBR-4 (universal service identifier) is empty")
    issued = ctx.when(obr.get(22), "OBR-22")
    filler = _ei(obr.rep(3))
    return clean(
        {
            "resourceType": "DiagnosticReport",
            "id": hl7_source_id("DiagnosticReport", scope),
            "identifier": [
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "FILL"}]},
                    "value": filler[1],
                }
            ]
            if filler
            else [],
            "status": report_status(obr.get(25)),
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}],
            "code": code,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "effectiveDateTime": ctx.when(obr.get(7), "OBR-7"),
            "issued": issued if issued and len(issued) > 10 else None,
            "result": [{"reference": ref} for ref in results],
        }
    )


def order_key(orc: Segment, obr: Segment | None) -> tuple[str, str]:
    """An order's identity: placer order number (ORC-2, else OBR-2), else filler (ORC-3, else OBR-3)."""
    for rep in (orc.rep(2), obr.rep(2) if obr else None, orc.rep(3), obr.rep(3) if obr else None):
        key = _ei(rep)
        if key:
            return key
    raise MappingError("order has no placer or filler order number (ORC-2, ORC-3, OBR-2, OBR-3)")


def _order_identifiers(orc: Segment) -> list[dict[str, Any]]:
    out = []
    for field, kind in ((2, "PLAC"), (3, "FILL")):
        key = _ei(orc.rep(field))
        if key:
            out.append(
                {
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": kind}]},
                    "value": key[1],
                }
            )
    return out


def _first(group: list[Segment], name: str) -> Segment | None:
    return next((s for s in group if s.name == name), None)


def orc_to_service_request(
    orc: Segment, group: list[Segment], ctx: Hl7Context, patient_ref: str, encounter_ref: str | None
) -> dict[str, Any]:
    """ORC + OBR (+ TQ1, NTE, DG1) → ServiceRequest: code (OBR-4), status (ORC-5/ORC-1), authored (ORC-9),
    requester (ORC-12), priority and start (TQ1-9, TQ1-7), notes (NTE-3), reasons (DG1-3)."""
    obr, tq1 = _first(group, "OBR"), _first(group, "TQ1")
    code = cwe_to_codeable(obr.rep(4)) if obr else None
    if code is None:
        raise MappingError("order without OBR-4 (what is ordered)")
    namespace, value = order_key(orc, obr)
    return clean(
        {
            "resourceType": "ServiceRequest",
            "id": hl7_source_id("ServiceRequest", patient_ref, namespace, value),
            "identifier": _order_identifiers(orc),
            "status": order_status(orc),
            "intent": "order",
            "priority": PRIORITY.get(tq1.get(9) or "") if tq1 else None,
            "code": code,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "occurrenceDateTime": ctx.when(tq1.get(7), "TQ1-7") if tq1 else None,
            "authoredOn": ctx.when(orc.get(9), "ORC-9"),
            "requester": xcn_to_reference(orc.rep(12)),
            "reasonCode": [c for c in (cwe_to_codeable(d.rep(3)) for d in group if d.name == "DG1") if c],
            "note": [{"text": n.get(3)} for n in group if n.name == "NTE" and n.get(3)],
        }
    )


def orc_to_medication_request(
    orc: Segment, group: list[Segment], ctx: Hl7Context, patient_ref: str, encounter_ref: str | None
) -> dict[str, Any]:
    """ORC + RXE (+ RXR, TQ1) → MedicationRequest: medication (RXE-2), dose (3, 5), instructions (7),
    dispense (10, 11, 12), route (RXR-1), timing (TQ1-3, 7, 8)."""
    rxe = _first(group, "RXE")
    if rxe is None:
        raise MappingError("pharmacy order (ORC) without an RXE segment")
    medication = cwe_to_codeable(rxe.rep(2))
    if medication is None:
        raise MappingError("RXE-2 (give code) is empty")
    after = group[group.index(rxe) + 1 :]
    rxr, tq1 = _first(after, "RXR"), _first(after, "TQ1")
    amount = rxe.get(3)
    dose_units = rxe.rep(5)
    dosage = clean(
        {
            "text": "; ".join(r.c(1) or r.c(2) or "" for r in rxe.reps(7)) or None,
            "route": cwe_to_codeable(rxr.rep(1)) if rxr else None,
            "doseAndRate": [{"doseQuantity": {"value": _number(amount, "RXE-3"), **_unit_text(dose_units)}}]
            if amount
            else [],
            "timing": clean(
                {
                    "code": {"text": tq1.get(3)} if tq1.get(3) else None,
                    "repeat": clean(
                        {
                            "boundsPeriod": clean(
                                {"start": ctx.when(tq1.get(7), "TQ1-7"), "end": ctx.when(tq1.get(8), "TQ1-8")}
                            )
                        }
                    ),
                }
            )
            if tq1
            else None,
        }
    )
    dispense = rxe.get(10)
    namespace, value = order_key(orc, None)
    return clean(
        {
            "resourceType": "MedicationRequest",
            "id": hl7_source_id("MedicationRequest", patient_ref, namespace, value),
            "identifier": _order_identifiers(orc),
            "status": order_status(orc),
            "intent": "order",
            "medicationCodeableConcept": medication,
            "subject": {"reference": patient_ref},
            "encounter": {"reference": encounter_ref} if encounter_ref else None,
            "authoredOn": ctx.when(orc.get(9), "ORC-9"),
            "requester": xcn_to_reference(orc.rep(12)),
            "dosageInstruction": [dosage] if dosage else [],
            "dispenseRequest": clean(
                {
                    "quantity": {"value": _number(dispense, "RXE-10"), **_unit_text(rxe.rep(11))} if dispense else None,
                    "numberOfRepeatsAllowed": int(_number(rxe.get(12) or "", "RXE-12")) if rxe.get(12) else None,
                }
            ),
        }
    )


def _unit_text(rep: Rep | None) -> dict[str, Any]:
    """A CWE unit whose text is the readable unit (RXE-5, RXE-11): UCUM code only when the sender says so."""
    if rep is None:
        return {}
    if (rep.c(3) or "").upper() == "UCUM" and rep.c(1):
        return clean({"unit": rep.c(2) or rep.c(1), "system": UCUM, "code": rep.c(1)})
    return clean({"unit": rep.c(2) or rep.c(1)})


def obx_to_attachment(obx: Segment, where: str, lines: Sequence[Segment] = ()) -> dict[str, Any]:
    """OBX ED (encapsulated data) or TX/FT/ST lines (with the further OBX of its text, `lines`) → Attachment."""
    kind, rep = obx.get(2), obx.rep(5)
    if kind == "ED" and rep is not None:
        media = "/".join(p.lower() for p in (rep.c(2), rep.c(3)) if p) or None
        encoding, data = (rep.c(4) or "").upper(), rep.c(5)
        if data and encoding == "A":  # ASCII text: FHIR wants base64
            data = base64.b64encode(data.encode()).decode()
        elif data and encoding not in ("BASE64", ""):
            raise MappingError(f"{where}: ED encoding {encoding!r} is not Base64 or A")
        return clean({"contentType": media, "data": data})
    if kind in ("TX", "FT", "ST"):
        text = _text([obx, *lines]) if lines else "\n".join(r.c(1) or "" for r in obx.reps(5))
        return {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}
    raise MappingError(f"{where}: OBX-2 {kind!r} in a document message is not document content")


def document_status(txa: Segment, event: str) -> tuple[str, str | None]:
    """DocumentReference (status, docStatus): TXA-19 availability (table 0275) → status, TXA-17 completion
    (table 0271) → docStatus; MDM^T11 (document cancel) → entered-in-error. A document not available for
    patient care (UN) is preliminary whatever TXA-17 says. An unknown code is a MappingError, never "current"."""
    availability, completion = txa.get(19), txa.get(17)
    if availability is not None and availability not in DOCUMENT_AVAILABILITY:
        raise MappingError(f"TXA-19 availability status {availability!r} is not one of {_codes(DOCUMENT_AVAILABILITY)}")
    if completion is not None and completion not in DOCUMENT_COMPLETION:
        raise MappingError(f"TXA-17 completion status {completion!r} is not one of {_codes(DOCUMENT_COMPLETION)}")
    status = "entered-in-error" if event == "T11" else DOCUMENT_AVAILABILITY[availability or "AV"]
    return status, "preliminary" if availability == "UN" else DOCUMENT_COMPLETION.get(completion or "")


def _codes(table: dict[str, str]) -> str:
    return ", ".join(sorted(table))


def _content_not_sent() -> dict[str, Any]:
    """The attachment of a withdrawn document whose cancel message carries no content (FHIR needs one)."""
    return {"extension": [{"url": _DATA_ABSENT_EXTENSION, "valueCode": "unknown"}]}


def txa_to_document_reference(
    txa: Segment,
    contents: list[dict[str, Any]],
    ctx: Hl7Context,
    patient_ref: str,
    encounter_ref: str | None,
    control_id: str,
    event: str,
) -> dict[str, Any]:
    """TXA (+ its OBX content) → DocumentReference: type (TXA-2), date (4), author (9), unique id (12),
    status (19, MDM event), docStatus (17, 19). Only an entered-in-error document may come without content."""
    unique = txa.rep(12)
    number = (unique.c(1) if unique else None) or None
    date = ctx.when(txa.get(4), "TXA-4")
    author = xcn_to_reference(txa.rep(9))
    status, doc_status = document_status(txa, event)
    if status in ("entered-in-error", "superseded") and number is None:
        # Keyed by this message instead, it would be a new document, leaving the one it cancels current.
        raise MappingError(f"TXA-12 (unique document number) is empty: a document made {status} must name it")
    if not contents and status != "entered-in-error":
        raise MappingError("no document content: only a cancelled document is written without it")
    return clean(
        {
            "resourceType": "DocumentReference",
            "id": hl7_source_id("DocumentReference", patient_ref, number or control_id),
            "masterIdentifier": {"value": number} if number else None,
            "status": status,
            "docStatus": doc_status,
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0270", "code": txa.get(2)}]}
            if txa.get(2)
            else None,
            "subject": {"reference": patient_ref},
            "date": date if date and len(date) > 10 else None,
            "author": [author] if author else [],
            "content": [{"attachment": c} for c in contents or [_content_not_sent()]],
            "context": {"encounter": [{"reference": encounter_ref}]} if encounter_ref else None,
        }
    )
