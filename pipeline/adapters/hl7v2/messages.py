"""One root per HL7 v2 message type: a message → the FHIR resources it carries.

ADT (A01 A02 A03 A04 A05 A06 A07 A08 A11 A12 A13 A28 A31): Patient, Encounter, Coverage, and the
clinical segments an ADT may carry (AL1, DG1, PR1, OBX), plus cdrsync's tumour-board ZTB → Flag.
ORU^R01: DiagnosticReport per OBR with its OBX as Observations. ORM^O01 / OML^O21: ServiceRequest per
ORC. RDE^O11: MedicationRequest per ORC/RXE. MDM (T01-T11): DocumentReference from TXA and its OBX.
ADT^A40 (merge): each PID (the surviving patient) with its MRG (the record merged into it) becomes the
surviving Patient, as an update, and the merged record as a Patient that is no longer active and links to
it (`link.type` replaced-by) under the surviving patient's identifiers. Whether that moves anything between
central Patients is not decided here but by the identity stage (pipeline/identity.py): moving records from
one person to another is a clinical decision, so a merge across two shared identifiers goes to identity
review.
A segment that cannot be mapped is returned as a problem (segment, position, reason), never dropped. A
message naming more than one patient or visit (PID, PV1) is rejected whole: its segments after the second
PID would otherwise be filed under the first patient. A TX/FT text split over consecutive OBX lines is one
Observation (or one document attachment); two segments that still map to one id are reported by set id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ...errors import MappingError
from .datatypes import Hl7Context, hl7_source_id
from .er7 import Message, Segment, parse_er7
from .orders import (
    continues_text,
    obr_to_diagnostic_report,
    obx_to_attachment,
    obx_to_observation,
    orc_to_medication_request,
    orc_to_service_request,
    report_scope,
    txa_to_document_reference,
)
from .segments import (
    al1_to_allergy,
    dg1_to_condition,
    in1_to_coverage,
    merged_identifiers,
    merged_key,
    pid_to_patient,
    pr1_to_procedure,
    pv1_to_encounter,
    ztb_to_flag,
)

__all__ = ["ADT_EVENTS", "Hl7Mapped", "message_to_resources"]

ADT_EVENTS = frozenset({"A01", "A02", "A03", "A04", "A05", "A06", "A07", "A08", "A11", "A12", "A13", "A28", "A31"})


@dataclass
class Hl7Mapped:
    """What a message became: resources (its Patient first) and the segments that could not be mapped."""

    message_type: str
    resources: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


Mapper = Callable[..., "dict[str, Any] | None"]


@dataclass
class _Frame:
    """The patient and encounter of a message, shared by every segment mapper."""

    message: Message
    ctx: Hl7Context
    out: Hl7Mapped
    patient_ref: str = ""
    encounter_ref: str | None = None
    consumed: set[int] = field(default_factory=set)  # id() of segments a root already mapped
    # (resource type, id) → the segment each mapping of it came from, in the order of out.resources
    origins: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def position(self, segment: Segment) -> int:
        """The segment's 1-based position in the message (by identity: two segments may be equal)."""
        return next(n for n, s in enumerate(self.message.segments, 1) if s is segment)

    def where(self, segment: Segment) -> str:
        """Segment name and its 1-based position in the message: enough to find it, no content."""
        return f"{segment.name} (segment {self.position(segment)})"

    def label(self, segment: Segment) -> str:
        """`where`, with the set id (field 1) of the segments that have one: how a sender names its OBX."""
        set_id = None if segment.name in _NO_SET_ID else segment.get(1)
        return f"{segment.name} (segment {self.position(segment)}, set id {set_id})" if set_id else self.where(segment)

    def add(self, segment: Segment, resource: dict[str, Any]) -> None:
        """Add a mapped resource, remembering the segment it came from."""
        self.out.resources.append(resource)
        self.origins.setdefault((resource["resourceType"], resource["id"]), []).append(self.label(segment))

    def attempt(
        self, segment: Segment, build: Callable[..., dict[str, Any] | None], *args: Any
    ) -> dict[str, Any] | None:
        """Run one segment mapper, `build(*args)`; a MappingError becomes a problem naming the segment."""
        self.consumed.add(id(segment))
        try:
            resource = build(*args)
        except MappingError as error:
            reason = str(error)
            where = self.where(segment)
            self.out.problems.append(reason if reason.startswith(where) else f"{where}: {reason}")
            return None
        if resource is not None:
            self.add(segment, resource)
        return resource


_NO_SET_ID = frozenset({"ORC", "RXE"})  # field 1 is the order control code, the quantity/timing


def _frame(message: Message, ctx: Hl7Context, out: Hl7Mapped, event: str) -> _Frame:
    """Patient (PID, required, one) and Encounter (PV1, when it names a visit) of a message."""
    pid = message.first("PID")
    if pid is None:
        raise MappingError(f"{out.message_type} message {message.control_id} has no PID segment")
    for name, what in (("PID", "patient"), ("PV1", "visit")):
        count = len(message.all(name))
        if count > 1:  # e.g. an ORU^R01 with several PATIENT_RESULT groups: one patient per message is mapped
            raise MappingError(
                f"{out.message_type} message {message.control_id} carries {count} {name} segments: "
                f"a message with more than one {what} is not mapped"
            )
    patient = pid_to_patient(pid, ctx)
    frame = _Frame(message, ctx, out, patient_ref=f"Patient/{patient['id']}")
    frame.add(pid, patient)
    pv1 = message.first("PV1")
    if pv1 is not None:
        encounter = frame.attempt(pv1, pv1_to_encounter, pv1, ctx, frame.patient_ref, event)
        if encounter is None and not any(p.startswith(frame.where(pv1)) for p in out.problems):
            out.problems.append(f"{frame.where(pv1)}: neither visit number (PV1-19) nor admit time (PV1-44)")
        frame.encounter_ref = f"Encounter/{encounter['id']}" if encounter else None
    for in1 in message.all("IN1"):
        frame.attempt(in1, in1_to_coverage, in1, ctx, frame.patient_ref)
    return frame


def _text_runs(frame: _Frame, segments: list[Segment]) -> list[list[Segment]]:
    """OBX segments in message order → runs: the consecutive lines of one TX/FT text (continues_text) form
    one run, every other OBX a run of its own."""
    runs: list[list[Segment]] = []
    for obx in segments:
        run = runs[-1] if runs else None
        if run and frame.position(obx) == frame.position(run[-1]) + 1 and continues_text(run[0], obx):
            run.append(obx)
        else:
            runs.append([obx])
    return runs


def _observation(
    frame: _Frame, run: list[Segment], scope: str, category: str | None, time: str | None
) -> dict[str, Any] | None:
    """One Observation from an OBX, or from the OBX lines of one text (a run of _text_runs)."""
    obx, lines = run[0], run[1:]
    frame.consumed.update(id(line) for line in lines)
    observation = partial(
        obx_to_observation,
        scope=scope,
        encounter_ref=frame.encounter_ref,
        default_time=time,
        category=category,
        where=frame.where(obx),
        lines=lines,
    )
    return frame.attempt(obx, observation, obx, frame.ctx, frame.patient_ref)


def _adt(frame: _Frame) -> None:
    """ADT carries no more than the segments every message type carries (see _clinical)."""


def _clinical(frame: _Frame) -> None:
    """Clinical segments not already mapped by the message's root: AL1, DG1, PR1, OBX, ZTB."""
    ctx, patient, encounter = frame.ctx, frame.patient_ref, frame.encounter_ref
    scope = f"{patient}|{encounter or ''}"
    unmapped = [s for s in frame.message.all("OBX") if id(s) not in frame.consumed]
    runs = {id(run[0]): run for run in _text_runs(frame, unmapped)}
    for segment in frame.message.segments:
        if id(segment) in frame.consumed:
            continue
        if segment.name == "AL1":
            frame.attempt(segment, al1_to_allergy, segment, ctx, patient)
        elif segment.name == "DG1":
            frame.attempt(segment, dg1_to_condition, segment, ctx, patient, encounter)
        elif segment.name == "PR1":
            frame.attempt(segment, pr1_to_procedure, segment, ctx, patient, encounter)
        elif segment.name == "OBX":  # a further line of a text is consumed with its first
            _observation(frame, runs[id(segment)], scope, None, None)
        elif segment.name == "ZTB":
            frame.attempt(segment, ztb_to_flag, segment, ctx, patient, encounter)


def _oru(frame: _Frame) -> None:
    """Each OBR with the OBX after it → DiagnosticReport + Observations; OBX outside any OBR → Observations."""
    message, patient = frame.message, frame.patient_ref
    for obr, members in message.groups("OBR", ("OBX",)):
        scope = report_scope(obr, message.control_id, message.sender)
        time = _report_time(frame, obr)
        observations = [_observation(frame, run, scope, "laboratory", time) for run in _text_runs(frame, members)]
        # Two results with one id are reported by _check_unique; the report names each result once.
        refs = list(dict.fromkeys(f"Observation/{o['id']}" for o in observations if o))
        frame.attempt(
            obr,
            obr_to_diagnostic_report,
            obr,
            frame.ctx,
            patient,
            frame.encounter_ref,
            scope,
            refs,
        )


def _report_time(frame: _Frame, obr: Segment) -> str | None:
    """OBR-7, the default time of its results; an invalid one is reported with the OBR (its report is not
    mapped) while its results still flow, as with any other bad OBR."""
    try:
        return frame.ctx.when(obr.get(7), "OBR-7")
    except MappingError:
        return None


def _orders(frame: _Frame) -> None:
    for orc, group in frame.message.groups("ORC", ("OBR", "TQ1", "NTE", "DG1")):
        frame.consumed.update(id(s) for s in group)
        frame.attempt(orc, orc_to_service_request, orc, group, frame.ctx, frame.patient_ref, frame.encounter_ref)


def _pharmacy(frame: _Frame) -> None:
    for orc, group in frame.message.groups("ORC", ("RXE", "RXR", "TQ1", "RXO", "RXC")):
        frame.attempt(
            orc,
            orc_to_medication_request,
            orc,
            group,
            frame.ctx,
            frame.patient_ref,
            frame.encounter_ref,
        )


def _document(frame: _Frame) -> None:
    txa = frame.message.first("TXA")
    if txa is None:
        raise MappingError(f"{frame.out.message_type} message {frame.message.control_id} has no TXA segment")
    contents = []
    for obx, *lines in _text_runs(frame, frame.message.all("OBX")):
        frame.consumed.update(id(s) for s in (obx, *lines))
        try:
            contents.append(obx_to_attachment(obx, frame.where(obx), lines))
        except MappingError as error:
            frame.out.problems.append(str(error))
    event = frame.message.message_type[1]
    # MDM^T11 (and a document marked deleted, TXA-19 CA) withdraws the document and carries no content.
    if not contents and event != "T11" and txa.get(19) != "CA":
        raise MappingError(f"{frame.out.message_type} message {frame.message.control_id} has no document content")
    frame.attempt(
        txa,
        txa_to_document_reference,
        txa,
        contents,
        frame.ctx,
        frame.patient_ref,
        frame.encounter_ref,
        frame.message.control_id,
        event,
    )


_ROOTS: dict[tuple[str, str | None], Callable[[_Frame], None]] = {
    **{("ADT", event): _adt for event in ADT_EVENTS},
    ("ORU", "R01"): _oru,
    ("ORM", "O01"): _orders,
    ("OML", "O21"): _orders,
    ("RDE", "O11"): _pharmacy,
    ("MDM", None): _document,
}


def _merges(message: Message, ctx: Hl7Context) -> list[dict[str, Any]]:
    """ADT^A40: per PID and its MRG, the surviving Patient and the merged one (replaced-by the surviving)."""
    resources = []
    for pid, members in message.groups("PID", ("PD1", "MRG", "PV1")):
        merged = [segment for segment in members if segment.name == "MRG"]
        if len(merged) != 1:
            raise MappingError(
                f"ADT^A40 {message.control_id}: a PID with {len(merged)} MRG segments; each merge names one record"
            )
        survivor = pid_to_patient(pid, ctx)
        merged_id = hl7_source_id("Patient", *merged_key(merged[0]))
        if merged_id == survivor["id"]:
            raise MappingError(f"ADT^A40 {message.control_id} merges a patient into itself (MRG-1 is PID-3)")
        replaced = {
            "resourceType": "Patient",
            "id": merged_id,
            "active": False,
            # where its records belong now (the surviving patient's identifiers, the shared one among them), and
            # its own earlier ones
            "identifier": [*survivor.get("identifier", []), *merged_identifiers(merged[0], ctx)],
            "link": [{"other": {"reference": f"Patient/{survivor['id']}"}, "type": "replaced-by"}],
        }
        resources += [survivor, replaced]
    if not resources:
        raise MappingError(f"ADT^A40 {message.control_id} has no PID: the message names no patient")
    return resources


def message_to_resources(raw: str, ctx: Hl7Context) -> Hl7Mapped:
    """Map one ER7 message; MappingError for a message type not carried or a message without a patient."""
    message = parse_er7(raw)
    code, event = message.message_type
    out = Hl7Mapped(message_type=f"{code}^{event}")
    if (code, event) == ("ADT", "A40"):
        out.resources = _merges(message, ctx)
        _check_unique(out)
        return out
    root = _ROOTS.get((code, event)) or (_ROOTS.get((code, None)) if code == "MDM" else None)
    if root is None:
        raise MappingError(f"message type {code}^{event} ({message.control_id}) is not carried by the hl7v2 adapter")
    frame = _frame(message, ctx, out, event)
    root(frame)
    _clinical(frame)
    _not_carried(frame)
    _check_unique(out, frame.origins)
    return out


def _check_unique(out: Hl7Mapped, origins: dict[tuple[str, str], list[str]] | None = None) -> None:
    """Two segments that map to one resource id would overwrite each other: keep the first, report a repeat with
    different content, naming both segments (`origins`; ADT^A40 has none). A repeat with the same content (a
    segment sent twice; two merges into one surviving patient) loses nothing and is not reported."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    repeats: dict[tuple[str, str], int] = {}
    kept = []
    for resource in out.resources:
        key = (resource["resourceType"], resource["id"])
        if key not in seen:
            seen[key] = resource
            kept.append(resource)
            continue
        repeats[key] = repeats.get(key, 0) + 1
        if seen[key] == resource:
            continue  # a segment sent twice: nothing of it is lost
        named = (origins or {}).get(key, [])  # in the order of out.resources
        if len(named) > repeats[key]:
            first, repeat = named[0], named[repeats[key]]
            out.problems.append(f"{first} and {repeat} map to the same {key[0]} (id {key[1]}) with different content")
        else:
            out.problems.append(f"two segments map to the same {key[0]} (id {key[1]}) with different content")
    out.resources = kept


# Segments deliberately not carried (docs/mapping/hl7v2.md says why for each): message control,
# administrative and financial segments, and details the carried resources do not hold.
NOT_CARRIED = frozenset(
    {
        "MSH",
        "SFT",
        "EVN",
        "PD1",
        "ARV",
        "ROL",
        "PRT",
        "NK1",
        "PV2",
        "DB1",
        "GT1",
        "IN2",
        "IN3",
        "ACC",
        "RF1",
        "PDA",
        "CTD",
        "FT1",
        "CTI",
        "BLG",
        "SPM",
        "SAC",
        "NTE",
        "TQ1",
        "TQ2",
        "RXO",
        "RXR",
        "RXC",
        "CDO",
        "CON",
        "MRG",
        "UB1",
        "UB2",
        "DRG",
        "NPU",
        "TXA",
        "ZTB",
    }
)
_MAPPED = frozenset({"PID", "PV1", "IN1", "AL1", "DG1", "PR1", "OBX", "OBR", "ORC", "RXE"})


def _not_carried(frame: _Frame) -> None:
    """A segment this adapter neither maps nor deliberately leaves out is reported, not ignored."""
    for segment in frame.message.segments:
        if segment.name not in NOT_CARRIED and segment.name not in _MAPPED:
            frame.out.problems.append(
                f"{frame.where(segment)}: segment {segment.name} is not known to the hl7v2 adapter"
            )
