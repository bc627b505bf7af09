"""Route triggers (DESIGN.md decision 6): what a `trigger: tumorboard-flag` route lets leave the hospital.

A route with `trigger: all` carries every record. A route with `trigger: tumorboard-flag` carries a
patient's records only while the site holds an active `Flag` with code `tumorboard` for that patient:

  * the flagged encounter (Flag.encounter) and every resource that references it,
  * the patient's Patient and Coverage, and the tumour-board Flag itself.

When a Flag becomes active, what it selects is sent at once even if it changed before the flag
(backfill): the latest version of every record a route did not send is kept in state. Later changes
of selected resources follow as they come. A Flag set inactive (or deleted, or entered-in-error)
stops new sends: what was sent stays at the target, later changes wait in state again, and only the
Flag's own change is sent, so the board sees that the case was withdrawn. A delete is sent only for
a resource that was sent. Nothing of a patient without an active flag is ever emitted.

A tumour-board Flag without an encounter selects only the patient's Patient, Coverage and the Flag:
sending every encounter of the patient would disclose more than the clinician asked for.

State, in three Faust tables co-partitioned with fhir.identified.v1 (keyed by global patient key), so no
value grows with a patient's history (a changelog record must stay under Kafka's message size):
  trigger_flags_by_route_patient      "site|target|patient" → {"flags": {flag ref: flagged encounter ref or ""}}
  trigger_resource_by_route_reference "site|target|ref" → {"sent": bool, "held": record or absent,
                                                            "anchors": [where it is indexed], "patient": key}
  trigger_held_by_route_anchor        "site|target|patient|anchor" → refs held there, in arrival order
A held record is indexed under the anchors a flag could select it by: "patient" (Patient, Coverage, and a
delete of something sent), its own ref (an Encounter), or each Encounter it references. A record with no
anchor can never be selected by a flag (it references no encounter): it is not kept; a later version that
references an encounter arrives again. Records are kept in target form (RoutedResource, Avro, base64),
the latest version per resource.
"""

from __future__ import annotations

import base64
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .config import Config
from .records import RoutedResource, decode, encode
from .resources import dependency_rank

__all__ = [
    "TRIGGER_ALL",
    "TRIGGER_TUMORBOARD",
    "TUMORBOARD_CODE",
    "Selection",
    "TriggerTables",
    "held_refs",
    "route_trigger",
    "select_records",
    "tumorboard_flag",
]

TRIGGER_ALL = "all"
TRIGGER_TUMORBOARD = "tumorboard-flag"
TUMORBOARD_CODE = "tumorboard"
_ACTIVE = "active"

_PATIENT_ANCHOR = "patient"


@dataclass
class TriggerTables:
    """The trigger's three tables (Faust tables in the worker, dicts in tests)."""

    flags: MutableMapping[str, dict[str, Any]]
    resources: MutableMapping[str, dict[str, Any]]
    held: MutableMapping[str, list[str]]


@dataclass
class Selection:
    """What one record lets the route send, in write order."""

    send: list[RoutedResource] = field(default_factory=list)
    backfilled: list[RoutedResource] = field(default_factory=list)  # part of `send`, released from state
    held: bool = False  # the incoming record waits in state (not selected now)
    flag: str | None = None  # the Flag ref that caused a backfill


def route_trigger(config: Config, record: RoutedResource) -> str:
    """The trigger of the route a record travels (site → target); `all` if the site has no such route."""
    site = config.sites.get(record.site)
    for route in site.routes if site else []:
        if route.target == record.target:
            return route.trigger
    return TRIGGER_ALL


def tumorboard_flag(resource: dict[str, Any]) -> tuple[bool, str] | None:
    """(active, flagged encounter ref or "") of a tumour-board Flag; None for any other resource."""
    if resource.get("resourceType") != "Flag":
        return None
    codings = (resource.get("code") or {}).get("coding") or []
    if not any(isinstance(c, dict) and str(c.get("code", "")).lower() == TUMORBOARD_CODE for c in codings):
        return None
    encounter = (resource.get("encounter") or {}).get("reference")
    return resource.get("status") == _ACTIVE, encounter if isinstance(encounter, str) else ""


def _selected(record: RoutedResource, flags: dict[str, str], was_sent: bool) -> bool:
    """Whether the active flags select a record now."""
    if not flags:
        return False
    ref = record.target_ref
    if record.is_delete:
        return was_sent  # nothing to delete at the target otherwise
    flagged = {encounter for encounter in flags.values() if encounter}
    if record.resource_type == "Patient":
        return record.target_id == record.patient_key
    if record.resource_type == "Coverage" or ref in flags:
        return True
    if record.resource_type == "Encounter":
        return ref in flagged
    return any(dependency in flagged for dependency in record.dependencies)


def _anchors(record: RoutedResource, was_sent: bool) -> list[str]:
    """Where a held record is indexed: what a future flag could select it by (none: it never can be)."""
    if record.is_delete:
        return [_PATIENT_ANCHOR] if was_sent else []
    if record.resource_type == "Patient":
        return [_PATIENT_ANCHOR] if record.target_id == record.patient_key else []
    if record.resource_type == "Coverage":
        return [_PATIENT_ANCHOR]
    if record.resource_type == "Encounter":
        return [record.target_ref]
    return sorted({d for d in record.dependencies if d.startswith("Encounter/")})


def _pack(record: RoutedResource) -> str:
    return base64.b64encode(encode(record)).decode()


def _unpack(item: str) -> RoutedResource:
    return decode(base64.b64decode(item), RoutedResource)


def _update_flags(flags: dict[str, str], record: RoutedResource) -> str | None:
    """Apply a Flag change to the active flags; the ref of a flag that became active (or moved), else None."""
    ref = record.target_ref
    body = orjson.loads(record.resource) if record.resource else {}
    flag = tumorboard_flag(body) if record.resource_type == "Flag" and not record.is_delete else None
    if flag is not None and flag[0]:
        activated = flags.get(ref) != flag[1]
        flags[ref] = flag[1]
        return ref if activated else None
    flags.pop(ref, None)
    return None


class _Route:
    """One route's and patient's view of the trigger tables."""

    def __init__(self, tables: TriggerTables, record: RoutedResource) -> None:
        self.tables = tables
        self.route = f"{record.site}|{record.target}"
        self.patient = f"{self.route}|{record.patient_key}"

    def entry(self, ref: str) -> dict[str, Any]:
        return dict(self.tables.resources.get(f"{self.route}|{ref}") or {})

    def unhold(self, ref: str, entry: dict[str, Any]) -> None:
        """Take a resource's held version out of every index it is in (of the patient it was held for)."""
        patient = entry.pop("patient", self.patient)
        for anchor in entry.pop("anchors", []):
            key = f"{patient}|{anchor}"
            remaining = [r for r in self.tables.held.get(key, []) if r != ref]
            if remaining:
                self.tables.held[key] = remaining
            else:
                self.tables.held.pop(key, None)
        entry.pop("held", None)

    def hold(self, record: RoutedResource, entry: dict[str, Any], anchors: list[str]) -> None:
        """Keep the latest version, indexed by its anchors (not at all without one: no flag can select it)."""
        if not anchors:
            return
        for anchor in anchors:
            key = f"{self.patient}|{anchor}"
            self.tables.held[key] = [*self.tables.held.get(key, []), record.target_ref]
        entry.update(held=_pack(record), anchors=anchors, patient=self.patient)

    def store(self, ref: str, entry: dict[str, Any]) -> None:
        if entry.get("sent") or entry.get("held"):
            self.tables.resources[f"{self.route}|{ref}"] = entry
        else:
            self.tables.resources.pop(f"{self.route}|{ref}", None)

    def held_at(self, anchor: str) -> list[str]:
        return list(self.tables.held.get(f"{self.patient}|{anchor}", []))


def _backfill(view: _Route, flags: dict[str, str], flag_ref: str) -> list[RoutedResource]:
    """Held records the newly active flag selects, taken out of state."""
    anchors = [_PATIENT_ANCHOR, *([flags[flag_ref]] if flags[flag_ref] else [])]
    found: list[RoutedResource] = []
    for anchor in anchors:
        for ref in view.held_at(anchor):
            entry = view.entry(ref)
            candidate = _unpack(entry["held"]) if entry.get("held") else None
            if candidate is not None and _selected(candidate, flags, bool(entry.get("sent"))):
                found.append(candidate)
                view.unhold(ref, entry)
                view.store(ref, entry)
    return found


def select_records(tables: TriggerTables, record: RoutedResource, trigger: str) -> Selection:
    """What the route sends for this record: itself, backfill from state, or nothing (kept in state)."""
    if trigger == TRIGGER_ALL:
        return Selection(send=[record])
    view = _Route(tables, record)
    flags: dict[str, str] = dict((tables.flags.get(view.patient) or {}).get("flags", {}))
    ref = record.target_ref
    entry = view.entry(ref)
    was_sent = bool(entry.get("sent"))
    view.unhold(ref, entry)
    activated = _update_flags(flags, record) if record.resource_type == "Flag" else None
    out = Selection(flag=activated)
    if _selected(record, flags, was_sent) or (record.resource_type == "Flag" and was_sent):
        out.send.append(record)
    else:
        view.hold(record, entry, _anchors(record, was_sent))  # the latest version waits for a flag
        out.held = True
    view.store(ref, entry)
    if activated is not None:
        out.backfilled = _backfill(view, flags, activated)
        # Patient before Encounter/Coverage before the rest; within a rank in source commit order (stable).
        candidates = [*out.backfilled, *out.send]
        out.send = sorted(candidates, key=lambda r: (dependency_rank(r.resource_type), r.source_commit_ms))
    for chosen in out.send:
        sent_entry = view.entry(chosen.target_ref)
        sent_entry["sent"] = not chosen.is_delete
        view.store(chosen.target_ref, sent_entry)
    if record.resource_type == "Flag":
        tables.flags[view.patient] = {"flags": flags}
    return out


def held_refs(tables: TriggerTables, site: str, target: str, patient_key: str) -> list[str]:
    """Every ref a route keeps back for a patient (a scan: for tests and tools, not the stream)."""
    prefix = f"{site}|{target}|{patient_key}|"
    return sorted({ref for key, refs in tables.held.items() if key.startswith(prefix) for ref in refs})
