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

State (Faust table `trigger_state_by_route_patient`, co-partitioned with fhir.identified.v1, whose
key is the global patient key), one entry per "site|target|patient key":
  {"flags": {flag ref: flagged encounter ref or ""}, "sent": [refs sent], "held": {ref: record}}
Records are kept in target form (RoutedResource, Avro, base64), the latest version per resource.
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
    "route_trigger",
    "select_records",
    "state_key",
    "tumorboard_flag",
]

TRIGGER_ALL = "all"
TRIGGER_TUMORBOARD = "tumorboard-flag"
TUMORBOARD_CODE = "tumorboard"
_ACTIVE = "active"

TriggerStates = MutableMapping[str, dict[str, Any]]


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


def state_key(record: RoutedResource) -> str:
    """Key of the trigger state a record belongs to: its route and patient."""
    return f"{record.site}|{record.target}|{record.patient_key}"


def tumorboard_flag(resource: dict[str, Any]) -> tuple[bool, str] | None:
    """(active, flagged encounter ref or "") of a tumour-board Flag; None for any other resource."""
    if resource.get("resourceType") != "Flag":
        return None
    codings = (resource.get("code") or {}).get("coding") or []
    if not any(isinstance(c, dict) and str(c.get("code", "")).lower() == TUMORBOARD_CODE for c in codings):
        return None
    encounter = (resource.get("encounter") or {}).get("reference")
    return resource.get("status") == _ACTIVE, encounter if isinstance(encounter, str) else ""


def _selected(record: RoutedResource, flags: dict[str, str], sent: set[str]) -> bool:
    """Whether the active flags select a record now."""
    if not flags:
        return False
    ref = record.target_ref
    if record.is_delete:
        return ref in sent  # nothing to delete at the target otherwise
    flagged = {encounter for encounter in flags.values() if encounter}
    if record.resource_type == "Patient":
        return record.target_id == record.patient_key
    if record.resource_type == "Coverage" or ref in flags:
        return True
    if record.resource_type == "Encounter":
        return ref in flagged
    return any(dependency in flagged for dependency in record.dependencies)


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


def select_records(states: TriggerStates, record: RoutedResource, trigger: str) -> Selection:
    """What the route sends for this record: itself, backfill from state, or nothing (kept in state)."""
    if trigger == TRIGGER_ALL:
        return Selection(send=[record])
    key = state_key(record)
    entry = states.get(key) or {"flags": {}, "sent": [], "held": {}}
    flags: dict[str, str] = dict(entry["flags"])
    sent: set[str] = set(entry["sent"])
    held: dict[str, str] = dict(entry["held"])
    ref = record.target_ref
    was_sent = ref in sent
    activated = _update_flags(flags, record) if record.resource_type == "Flag" else None
    held.pop(ref, None)
    out = Selection(flag=activated)
    if _selected(record, flags, sent) or (record.resource_type == "Flag" and was_sent):
        out.send.append(record)
    elif not record.is_delete or was_sent:
        held[ref] = _pack(record)  # the latest version waits for a flag
        out.held = True
    if activated is not None:
        for item_ref, item in list(held.items()):
            candidate = _unpack(item)
            if _selected(candidate, flags, sent):
                out.backfilled.append(candidate)
                del held[item_ref]
        # Patient before Encounter/Coverage before the rest; stable, so arrival order is kept within a rank.
        out.send = sorted([*out.backfilled, *out.send], key=lambda r: dependency_rank(r.resource_type))
    for chosen in out.send:
        if chosen.is_delete:
            sent.discard(chosen.target_ref)
        else:
            sent.add(chosen.target_ref)
    states[key] = {"flags": flags, "sent": sorted(sent), "held": held}
    return out
