"""Moving a site's resources from one central Patient to another, after an accepted identity review.

When a reviewer accepts that a hospital's patient is the person its Patient now names (`cdrsync identity
accept`, pipeline/identity.py), the records the hospital sent before the change are at the central Patient it
had. Left there, the person of the previous identifier would show another person's results, and the person
now named would miss them. So the identity stage asks for a move: a record with op MOVE (`move_request`),
keyed by the previous Patient, through the order stage (which takes the site out of that Patient,
pipeline/merge.py, so the Patient is updated without the site's identifiers, or deleted when no hospital
holds it any more, after the move) to the sink, which calls `move_site_records`:

* the Patient now named must be written already and hold the site's local patient (else RetryableError:
  the move comes back through the retry tiers; the accepted Patient version is on its way in its own
  partition); one that held it once and no longer does was emptied by a later review: the resources go to the
  other Patient that holds the local patient now (retried while none or several do), or stay if the site sent
  its patient back to the previous one;
* every resource of the site (by its origin tag) in the previous Patient's compartment (`$everything`) is
  read and written again with its references to the previous Patient pointing at the one now named, over
  the version read (If-Match). Only references change: the content is the hospital's, and the content hash
  stays. A resource exactly as cdrsync wrote it gets its written-by mark again (pipeline/sink.py), so it
  stays recognisably cdrsync's; one edited at the target since keeps its old mark, so a later change from
  the hospital is still a conflict for review, never a silent overwrite of that edit. One the target refuses
  does not stop the others; the MOVE then fails naming it (a dead letter);
* the compartment is read again until no resource of the site is left there (a resource changed between
  reading and writing is read again: RetryableError after three rounds). Each step is idempotent, so a move
  repeated after a crash or a retry finds less to do, and finally nothing.

The order stage notes the move on the previous Patient's entry (`moved`), so the site's records still on
their way there (parked for it, arriving later; at the sink, one that waited in a retry topic, as a dead
letter or behind one) are sent on to the new Patient (`redirect`). The new Patient's partition cannot read the
previous one's tables (the order stage's state is per partition, and the two are mostly in different ones,
perhaps of different workers), so the previous one hands over what it released of the site's resources
(`handover_records`: the MOVE again, keyed by the new Patient, carrying their entries); the new one takes them
as released (`take_over`), and the site's later records naming them are released there, not parked until
their park expires. Their source positions go too, so a Debezium re-send of an older change that reaches the new
partition after the hand-over is recognised as one; one that overtakes the hand-over is stopped at the sink (never
written over a later change of its row, nor over the deletion of one: pipeline/sink.py `_deleted_since`).

The previous Patient's partition may lag far behind the decision (a back-load), and the hospital's next records
reach the new one first. So the identity stage sends the new Patient's partition a notice before them
(`handover_notice`): the site's records there wait, parked, for the hand-over (`hold_for_handover`) and go on in
their order when its last record comes. A delete among them of a resource the previous partition released names
the change it released (`awaits_lsn`), since that partition's sink may lag too: the sink deletes only once the
target holds it (pipeline/sink.py `_delete`).

Limits: the target cannot tell two local patients of one hospital apart once both are at one central Patient
(a duplicate record at the hospital, both with the same insurance number): all of that site's resources
there move, and its later records there follow. `cdrsync identity show` lists what of the site is still at the
previous Patient and `cdrsync identity move` moves it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from urllib.parse import quote

import orjson

from .errors import (
    AwaitedWriteError,
    PermanentError,
    RejectedByTargetError,
    RetryableError,
    TargetAuthError,
    VersionConflictError,
)
from .fhirclient import FhirClient, WriteOutcome
from .ids import ORIGIN_TAG_SYSTEM
from .merge import merge_patient, merged_patient
from .ordering import (
    OrderState,
    adopt_released,
    hold,
    is_stale,
    live_referrers,
    order_record,
    take_parked,
    take_parked_of,
)
from .provenance import provenance_id
from .records import NormalizedResource, RoutedResource, canonical_hash
from .references import logical_system, map_references, relative_reference
from .sink import Versions, remarked, untouched_write

__all__ = [
    "HANDOVER",
    "MOVE",
    "MoveOrder",
    "MoveOutcome",
    "MoveRefusedError",
    "barrier_of",
    "everything_of_site",
    "handover_notice",
    "handover_records",
    "hold_for_handover",
    "holder_of",
    "holds_local_patient",
    "is_handover",
    "lift_expired_barrier",
    "move_id",
    "move_request",
    "move_site_records",
    "moved_to",
    "order_move",
    "redirect",
    "rewritten",
    "take_over",
]

log = logging.getLogger("cdrsync.patientmove")

MOVE = "MOVE"
HANDOVER = "HANDOVER"  # a MOVE as the new Patient's partition gets it (`handover_records`)
_ROUNDS = 3
_SKIPPED = ("Patient", "Provenance")  # the Patient itself; Provenances point at the resources, which keep their ids


class MoveRefusedError(PermanentError):
    """The target refused to take some of a site's resources with the reference to the Patient moved to."""

    error_class = "move_refused"


@dataclass(frozen=True)
class MoveOutcome(WriteOutcome):
    """What a move did: the resources moved, and those of them edited at the target since cdrsync wrote them."""

    moved: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)
    overtaken: bool = False  # later identity reviews took the patient back to the previous Patient: nothing moved
    to: str = ""  # the Patient moved to: the MOVE's, or the one a later review took the patient on to


def move_request(
    patient: NormalizedResource, target: str, previous_key: str, new_key: str, decided_ms: int, holder: str = ""
) -> RoutedResource:
    """The MOVE record for one target, from the Patient version whose review was accepted: the site's resources
    at Patient/previous_key go to Patient/new_key. Keyed (patient_key) by the previous Patient, in whose
    partition the order stage and the sink handle it. Its time is the decision's (the latency of what it leads
    to is counted from there, not from the Patient version reviewed, perhaps hours before)."""
    return RoutedResource.of(
        patient,
        source_commit_ms=decided_ms,
        captured_ms=decided_ms,
        target=target,
        target_id=previous_key,
        patient_key=previous_key,
        op=MOVE,
        resource=orjson.dumps({"to": new_key, "holder": holder or patient.source_id}).decode(),
        content_hash=None,
        source_version=None,
        source_lsn=None,
    )


def moved_to(record: RoutedResource) -> str:
    """The key of the Patient a MOVE record moves to."""
    assert record.op == MOVE and record.resource is not None
    return str(orjson.loads(record.resource)["to"])


def holder_of(record: RoutedResource) -> str:
    """The local patient (of the record's site) the Patient a MOVE record moves to must hold."""
    assert record.op == MOVE and record.resource is not None
    return str(orjson.loads(record.resource).get("holder") or record.source_id)


def holds_local_patient(patient: dict[str, Any] | None, site: str, local_id: str) -> bool:
    """Whether a central Patient carries a site's local patient id among its identifiers."""
    local = (logical_system(site, "Patient"), local_id)
    identifiers = (patient or {}).get("identifier") or []
    return any(isinstance(i, dict) and (i.get("system"), i.get("value")) == local for i in identifiers)


def rewritten(resource: dict[str, Any], previous_key: str, new_key: str) -> dict[str, Any] | None:
    """The resource with its references to Patient/previous_key pointing at Patient/new_key, re-marked when
    it is exactly as cdrsync wrote it; None when it does not reference Patient/previous_key."""
    body = _repointed({k: v for k, v in resource.items() if k != "meta"}, previous_key, new_key)
    if body is None:
        return None
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k in ("tag", "source", "profile", "security")}
    return remarked(resource, {**body, "meta": meta} if meta else body)


def _repointed(resource: dict[str, Any], previous_key: str, new_key: str) -> dict[str, Any] | None:
    """A copy of the resource with every reference to Patient/previous_key (a version suffix too) pointing at
    Patient/new_key; None when it has none."""
    changed = False

    def to_new(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
        nonlocal changed
        if relative_reference(reference) != ("Patient", previous_key):
            return None
        changed = True
        return {**node, "reference": f"Patient/{new_key}"}

    body: dict[str, Any] = map_references(resource, to_new)
    return body if changed else None


async def everything_of_site(client: FhirClient, patient_key: str, site: str) -> list[str]:
    """References of the resources of one origin site in a central Patient's compartment ($everything),
    the Patient itself and Provenances left out."""
    found: list[str] = []
    page: str | None = f"Patient/{patient_key}/$everything?_count=200&_elements=meta"
    first = True
    while page is not None:
        try:
            bundle = await client.get_json(page)
        except RejectedByTargetError as error:
            if first and error.status in (404, 410):  # no such Patient (never written, or deleted): nothing there
                return found
            if error.status == 410:  # a page the server no longer keeps: list again from the start
                raise RetryableError(f"the listing of Patient/{patient_key}'s compartment expired: {error}") from None
            raise
        first = False
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            tags = (resource.get("meta") or {}).get("tag") or []
            mine = any(t.get("system") == ORIGIN_TAG_SYSTEM and t.get("code") == site for t in tags)
            if mine and resource.get("resourceType") not in _SKIPPED:
                found.append(f"{resource['resourceType']}/{resource['id']}")
        page = next((link["url"] for link in bundle.get("link") or [] if link.get("relation") == "next"), None)
    return sorted(set(found))


async def move_site_records(
    client: FhirClient, record: RoutedResource, versions: Versions | None = None, *, returned: bool = False
) -> MoveOutcome:
    """Carry out a MOVE record (see the module docstring); done only once a listing of the previous Patient's
    compartment finds nothing of the site left to move. `versions` (the sink's table of the versions it wrote)
    gets each moved resource's new version.

    A resource the target refuses to take with the new reference (e.g. it also references something deleted at
    the centre since) does not stop the others: they move, and then the MOVE fails as a PermanentError naming
    it (a dead letter, for review; the previous Patient's update or delete waits behind it until the MOVE is
    replayed or discarded).

    returned: the site sent its patient to the previous Patient again since (the order stage's table says so):
    if a later review took the patient on from the Patient moved to, nothing moves."""
    previous_key, new_key, site = record.target_id, moved_to(record), record.site
    if not await _destination_ready(client, record, new_key):
        # A later review took the patient on from there (its own move lists only that Patient's compartment):
        # the site's resources here go to the Patient holding the patient now, or stay if it is this one.
        if returned:
            return MoveOutcome(200, None, overtaken=True)
        new_key = await _holding_now(client, record, new_key)
    moved: list[str] = []
    edited: list[str] = []
    refused: dict[str, str] = {}
    for _ in range(_ROUNDS):
        changed_meanwhile, to_move = [], 0
        for ref in await everything_of_site(client, previous_key, site):
            if ref in refused:
                continue
            resource_type, resource_id = ref.split("/", 1)
            current = await client.read(resource_type, resource_id)
            body = None if current is None else rewritten(current, previous_key, new_key)
            if current is None or body is None:  # deleted since, or in the compartment without naming the Patient
                continue
            to_move += 1
            version = str((current.get("meta") or {}).get("versionId"))
            try:
                outcome = await client.put(resource_type, resource_id, orjson.dumps(body), if_match=version)
            except VersionConflictError:  # written meanwhile (the hospital's next version): read again
                changed_meanwhile.append(ref)
                continue
            except TargetAuthError:
                raise
            except RejectedByTargetError as error:
                refused[ref] = str(error)
                continue
            if versions is not None and outcome.version_id is not None:
                versions[ref] = {"version": outcome.version_id}
            moved.append(ref)
            if untouched_write(current) is None:
                edited.append(ref)  # not re-marked: edited at the target since cdrsync wrote it
        if to_move == 0:
            break
    else:
        raise RetryableError(
            f"{site}'s resources at Patient/{previous_key} kept changing while being moved to Patient/{new_key} "
            f"({_ROUNDS} rounds; moved {len(moved)}, e.g. {(changed_meanwhile or moved or ['?'])[0]} changed)"
        )
    if refused:
        named = "; ".join(f"{ref}: {why}" for ref, why in sorted(refused.items()))
        raise MoveRefusedError(
            f"moved {len(moved)} resource(s) of {site} from Patient/{previous_key} to Patient/{new_key}; the target "
            f"refused {len(refused)}, which stay at Patient/{previous_key}: {named}"[:2000]
        )
    return MoveOutcome(200, None, moved, edited, to=new_key)


async def _destination_ready(client: FhirClient, record: RoutedResource, new_key: str) -> bool:
    """Whether the Patient moved to holds the site's local patient (True), or held it once and no longer does, a
    later review having taken it elsewhere (False: the move is overtaken, see `_holding_now`). AwaitedWriteError
    while it never held it yet: its version is on its way, in its own partition, or waits for that patient's own
    identity review (a merge into a record under review), which may take hours."""
    holder = holder_of(record)

    def holds(patient: dict[str, Any] | None) -> bool:
        return holds_local_patient(patient, record.site, holder)

    if holds(await client.read("Patient", new_key)):
        return True
    try:
        history = await client.get_json(f"Patient/{new_key}/_history?_count=100")
    except RejectedByTargetError as error:
        if error.status not in (404, 410):
            raise
        history = {}
    # Newest first (a deletion is an entry without a resource). The newest is read again here: the version read
    # above may have been followed by one written since, which holds it.
    versions = [entry.get("resource") for entry in history.get("entry") or [] if isinstance(entry, dict)]
    if versions and holds(versions[0]):
        return True
    if any(holds(version) for version in versions[1:]):
        return False
    raise AwaitedWriteError(  # its version is on its way, or held while that patient's own review is open
        f"Patient/{new_key} does not hold {record.site}'s patient {holder} yet: {record.site}'s records at "
        f"Patient/{record.target_id} move once it does"
    )


async def _holding_now(client: FhirClient, record: RoutedResource, overtaken_key: str) -> str:
    """The central Patient other than the previous one that holds the MOVE's local patient now, once a later
    review took it on from the one the MOVE named. (The previous Patient still shows it: its update without the
    site waits behind this MOVE at the sink.) RetryableError while none or several do: the later review's Patient
    version may be on its way, or a later move's update still waiting; past the retry tiers, a dead letter."""
    holder = holder_of(record)
    value = f"{_escaped(logical_system(record.site, 'Patient'))}|{_escaped(holder)}"
    found = await client.get_json(f"Patient?identifier={quote(value, safe='')}&_count=5")
    keys = sorted(
        str(entry["resource"]["id"])
        for entry in found.get("entry") or []
        if isinstance(entry, dict)
        and holds_local_patient(entry.get("resource"), record.site, holder)
        and str(entry["resource"]["id"]) != record.target_id
    )
    if len(keys) != 1:
        raise RetryableError(
            f"{record.site}'s patient {holder} left Patient/{overtaken_key} after a later identity review, and "
            f"{len(keys) or 'no'} other central Patient(s) hold it now: its resources at Patient/{record.target_id} "
            "move once exactly one does"
        )
    return keys[0]


def _escaped(value: str) -> str:
    """A token search parameter's part with FHIR's escapes (`\\`, `\\|`, `\\,`, `\\$`)."""
    for char in ("\\", "|", ",", "$"):
        value = value.replace(char, "\\" + char)
    return value


class MoveOrder(NamedTuple):
    """What the order stage does with a MOVE: records for the sink, in order; records of the site that waited for
    the previous Patient, sent on to the new one (the identified topic, keyed by it); and, sent there before
    them, the hand-over: what this partition released of the site's resources (`handover_records`)."""

    to_sink: list[RoutedResource]
    redirected: list[RoutedResource]
    handover: list[RoutedResource]
    #: records that waited for a hand-over (`hold_for_handover`) and turned out, once it came, to be re-sends of a
    #: change older than one it carried: not written (the order stage audits them as it does any stale re-send)
    stale: tuple[RoutedResource, ...] = ()


def order_move(
    state: OrderState,
    patients: MutableMapping[str, dict[str, Any]],
    move: RoutedResource,
    now_ms: int,
    partition: int = 0,
) -> MoveOrder:
    """The order stage's part of a MOVE: the MOVE itself, then the previous Patient without the site: updated,
    with the site's Provenance of it deleted, or deleted with every Provenance of it when no hospital holds it
    any more. The sink writes them in this order, one after the other (MOVE and Patient are both
    Patient/previous_key), so the Patient loses the site only once nothing of the site references it. A site
    no longer in the previous Patient (the MOVE of a second target, or one sent again after a crash or by
    `cdrsync identity move`) gets the previous Patient as it is now, for this target.

    The previous Patient's entry keeps a note that the site moved (`moved`: site → new key), so that the
    site's records still on their way to it (parked here, or released later) go to the new Patient instead
    (`redirected`), until the site sends a Patient to the previous one again (pipeline/merge.py drops the note).
    What this partition knew of the site's records there leaves with them (`handover_records`): its released
    entries, positions and parked records. So a delete of the previous Patient waits only for what other
    hospitals still have there (what the sink does not move)."""
    previous, new = f"Patient/{move.target_id}", f"Patient/{moved_to(move)}"
    # Hand-overs the site's records here still wait for: the new Patient's partition waits for them instead.
    waits = _awaited(patients, move.target_id, move.site)
    awaited = _pending(waits)
    if waits:  # over here: a notice of them sent again must not make the site's records wait here, nor stay here
        _set_awaited(patients, move.target_id, move.site, {})
    entry = patients.get(move.target_id)
    sites = list((entry or {}).get("sites", []))
    if move.site in sites:
        leaving = merge_patient(patients, replace(move, op="DELETE", resource=None))
    elif sites:  # the site left already: the Patient as it is now
        body = merged_patient(sites, (entry or {})["versions"])
        leaving = replace(move, op="UPDATE", resource=orjson.dumps(body).decode(), content_hash=canonical_hash(body))
    else:
        leaving = replace(move, op="DELETE", resource=None)
    kept = patients.get(move.target_id) or {"sites": [], "versions": {}}
    patients[move.target_id] = {**kept, "moved": {**(kept.get("moved") or {}), move.site: moved_to(move)}}
    # What this partition holds of the site's records of the previous Patient goes with them: the new Patient's
    # partition cannot read it here (`handover_records`).
    waiting = take_parked_of(state, move.target_id, move.site, partition)
    others = [s for s in sites if s != move.site]
    moving, referenced = _released_of_site(state, move.site, previous, new, alone=not others)
    moving_refs = [*moving, *(w.target_ref for w in waiting)]
    positions = {ref: seen for ref in [*moving_refs, *referenced] if (seen := state.positions.get(ref))}
    for ref in moving:  # they are the new Patient's now (they no longer hold up a delete of this one)
        state.released.pop(ref, None)
    for ref in moving_refs:
        state.positions.pop(ref, None)
    handover = handover_records(move, {**referenced, **moving}, positions, awaiting=awaited)
    if leaving.is_delete:  # (another hospital's records parked for it stay, and expire into dead letters)
        to_sink = [move, *order_record(state, leaving, now_ms, partition)]
    else:
        provenance = provenance_id(move.site, previous)
        gone = replace(move, resource_type="Provenance", target_id=provenance, op="DELETE", resource=None)
        to_sink = [move, *order_record(state, leaving, now_ms, partition), gone]
    redirected = [r for r in (redirect(patients, w) for w in waiting) if r is not None]
    return MoveOrder(to_sink, redirected, handover)


def _released_of_site(
    state: OrderState, site: str, previous: str, new: str, *, alone: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What this partition released of the site's resources at the previous Patient, as target ref → its entry in
    released_by_reference with references to the previous Patient made references to the new one: (those that
    reference the previous Patient, which move with it; the site's resources they reference, which may be another
    patient's too, e.g. a mother's encounter a newborn's is part of: copied, not taken). An entry released before
    entries named their site is the site's by its source positions, or when no other hospital holds the previous
    Patient (`alone`). Another hospital's resources stay: the sink moves only the site's."""

    def of_site(ref: str) -> bool:
        known = (state.released.get(ref) or {}).get("site")
        if known is not None:
            return bool(known == site)
        rows = list(state.positions.get(ref) or {})
        return all(row.startswith(f"{site}|") for row in rows) if rows else alone

    def entry(ref: str) -> dict[str, Any]:
        known = state.released[ref]
        return {**known, "deps": _repointed_refs(known.get("deps", []), previous, new)}

    moving = {ref: entry(ref) for ref in live_referrers(state, previous) if of_site(ref)}
    referenced: dict[str, Any] = {}
    frontier = [d for e in moving.values() for d in e["deps"]]
    while frontier:
        ref = frontier.pop()
        if ref in moving or ref in referenced or ref.startswith("Patient/") or ref not in state.released:
            continue
        if (state.released.get(ref) or {}).get("site", site) == site:
            referenced[ref] = entry(ref)
            frontier += referenced[ref]["deps"]
    return moving, referenced


_HANDOVER_BYTES = 512 * 1024  # per hand-over record, well within the broker's limit for one message


def handover_records(
    move: RoutedResource,
    released: Mapping[str, Any],
    positions: Mapping[str, Any],
    *,
    last: bool = True,
    awaiting: Mapping[str, int] | None = None,
) -> list[RoutedResource]:
    """The MOVE as the new Patient's partition gets it (op HANDOVER): keyed by the new Patient (its target_id
    stays the previous one), carrying what the previous Patient's partition released of the site (`released`)
    and the source positions it saw of the site's resources (`positions`), in records of bounded size, at least
    one. The site's later records go to the new Patient's partition and reference those resources; that
    partition cannot read the previous one's tables (in one worker or another), so without them it would hold
    them until their park expired.

    Each record names its MOVE (`move`: `move_id`, the first MOVE's along a chain of moves); the last one says
    so (`last`, False for every record of a part handed on that was not its MOVE's last) and carries the
    hand-overs the previous Patient still waited for itself (`awaiting`: move id → since when), which the new
    Patient then waits for in its place (`hold_for_handover`)."""
    body = orjson.loads(move.resource or "{}")
    body["move"] = body.get("move") or move_id(move)
    parts: list[tuple[dict[str, Any], dict[str, Any]]] = [({}, {})]
    size = 0
    for ref in sorted({*released, *positions}):
        grow = len(ref) + len(orjson.dumps(released.get(ref))) + len(orjson.dumps(positions.get(ref)))
        if size + grow > _HANDOVER_BYTES and size > 0:
            parts.append(({}, {}))
            size = 0
        size += grow
        if ref in released:
            parts[-1][0][ref] = released[ref]
        if ref in positions:
            parts[-1][1][ref] = positions[ref]
    final = len(parts) - 1
    return [
        replace(
            move,
            op=HANDOVER,
            patient_key=moved_to(move),
            resource=orjson.dumps(
                {
                    **body,
                    "released": entries,
                    "positions": seen,
                    "last": last and n == final,
                    **({"awaiting": dict(awaiting)} if awaiting and n == final else {}),
                }
            ).decode(),
        )
        for n, (entries, seen) in enumerate(parts)
    ]


def move_id(move: RoutedResource) -> str:
    """Which MOVE a hand-over comes from: its target, the previous Patient and the decision's time (a MOVE sent
    again by `cdrsync identity move` has its own)."""
    return f"{move.target}|{move.target_id}@{move.source_commit_ms}"


def handover_notice(move: RoutedResource) -> RoutedResource:
    """What the identity stage sends the new Patient's partition with an accepted review, before anything of the
    site goes there: a hand-over is coming (op HANDOVER, `notice`: the MOVE's `move_id`), so the site's records
    there wait for it (`hold_for_handover`). The MOVE itself goes to the previous Patient's partition, which may
    lag behind (a back-load): without the notice, a record the hospital sent after the decision could be
    released before what the previous Patient's partition still had to release of the same resources, e.g. the
    delete of an observation before its create."""
    body = orjson.loads(move.resource or "{}")
    notice = {**body, "notice": move_id(move)}
    return replace(move, op=HANDOVER, patient_key=moved_to(move), resource=orjson.dumps(notice).decode())


_BARRIER = "^"  # the park key of a site's records held for a hand-over: "^" + site + "|" + the Patient's key
_OVER_KEPT = 16  # per site and Patient, the hand-overs that are over, so that their notices sent again are ignored


def barrier_of(site: str, patient_key: str) -> str:
    """The park key under which a site's records at a Patient wait for a hand-over (`hold_for_handover`)."""
    return f"{_BARRIER}{site}|{patient_key}"


def _awaited(patients: Mapping[str, dict[str, Any]], patient_key: str, site: str) -> dict[str, dict[str, Any]]:
    """The hand-overs a site's records at a Patient wait for: move id → {"since": ms, "came": whether its last
    record came}. The records wait until every one of them came: one target's may come before another's."""
    return {m: dict(w) for m, w in (((patients.get(patient_key) or {}).get("awaiting") or {}).get(site) or {}).items()}


def _pending(awaited: Mapping[str, dict[str, Any]]) -> dict[str, int]:
    """Of the awaited hand-overs, those not come yet: move id → since when."""
    return {m: int(w["since"]) for m, w in awaited.items() if not w.get("came")}


def _set_awaited(
    patients: MutableMapping[str, dict[str, Any]],
    patient_key: str,
    site: str,
    awaited: Mapping[str, Any],
    over: list[str] | None = None,
) -> None:
    """Store what the site's records at the Patient wait for; nothing once every hand-over came. A hand-over no
    longer awaited (come, given up, passed on), and those in `over`, are recorded as over (`_over`), so that a
    notice of it sent again is ignored."""
    entry = dict(patients.get(patient_key) or {"sites": [], "versions": {}})
    stored = dict(awaited) if _pending(awaited) else {}
    ended = [*(over or []), *(m for m in {**_awaited(patients, patient_key, site), **awaited} if m not in stored)]
    awaiting = {s: a for s, a in (entry.get("awaiting") or {}).items() if s != site}
    if stored:
        awaiting[site] = stored
    if awaiting:
        entry["awaiting"] = awaiting
    else:
        entry.pop("awaiting", None)
    if ended:
        kept = [m for m in _over(patients, patient_key, site) if m not in ended] + list(dict.fromkeys(ended))
        entry["over"] = {**(entry.get("over") or {}), site: kept[-_OVER_KEPT:]}
    patients[patient_key] = entry


def _over(patients: Mapping[str, dict[str, Any]], patient_key: str, site: str) -> list[str]:
    """The hand-overs of the site at the Patient that are over: come (before their notice, too), or given up."""
    return list(((patients.get(patient_key) or {}).get("over") or {}).get(site) or [])


def _expect(patients: MutableMapping[str, dict[str, Any]], notice: RoutedResource, now_ms: int) -> None:
    """A notice (`handover_notice`): the site's records here wait for its hand-over, unless that came first. A
    notice seen before (sent again: a replayed dead letter, a batch processed again) changes nothing."""
    assert notice.resource is not None
    expected = str(orjson.loads(notice.resource)["notice"])
    here, site = notice.patient_key, notice.site
    awaited = _awaited(patients, here, site)
    if expected in awaited or expected in _over(patients, here, site):
        if expected not in awaited:
            log.info("notice of %s's hand-over %s at Patient/%s: it came already", site, expected, here)
        return
    _set_awaited(patients, here, site, {**awaited, expected: {"since": now_ms, "came": False}})
    entry = patients[here]
    # The site's records come here again: a note that they moved away from here (an earlier review) is over.
    moved = {s: key for s, key in (entry.get("moved") or {}).items() if s != site}
    if moved != (entry.get("moved") or {}):
        patients[here] = {k: v for k, v in entry.items() if k != "moved"} | ({"moved": moved} if moved else {})


def _handed(
    patients: MutableMapping[str, dict[str, Any]],
    handover: RoutedResource,
    move: str | None,
    awaiting: Mapping[str, int],
) -> bool:
    """The last record of a hand-over came (`move`: its MOVE), with what the Patient it comes from still waited
    for itself (`awaiting`: move id → since when). True when the site's records here wait for nothing more.
    A hand-over from a worker that did not name its MOVE counts for any awaited one of its target and Patient."""
    here, site = handover.patient_key, handover.site
    awaited = _awaited(patients, here, site)
    if move is None:
        move = next((m for m in _pending(awaited) if m.startswith(f"{handover.target}|{handover.target_id}@")), None)
    before_notice = []
    if move is not None and move in awaited:
        awaited[move]["came"] = True
    elif move is not None:  # before its notice (Kafka orders records per partition only): the notice holds nothing
        before_notice.append(move)
    over = _over(patients, here, site)
    for other, since in awaiting.items():
        if other not in over and other not in awaited:
            awaited[other] = {"since": since, "came": False}
    _set_awaited(patients, here, site, awaited, over=before_notice)
    return not _pending(awaited)


def hold_for_handover(
    state: OrderState,
    patients: MutableMapping[str, dict[str, Any]],
    record: RoutedResource,
    now_ms: int,
    partition: int,
    limit_ms: int,
) -> bool:
    """Park a site's record at a Patient whose hand-over it waits for (a notice came, its hand-over not yet); True
    if it was. `take_over` releases what waited, in order, once every awaited hand-over has come. The site's
    Patient versions do not wait: they name no resource of the site, and the MOVE at the previous Patient's sink
    waits for the new Patient to hold the site's patient. A hand-over awaited longer than `limit_ms` is given up:
    the records parked for it expire as parks do, into dead letters naming it (`lift_expired_barrier`), and once
    none is left the next record goes on without it (the previous Patient's MOVE failed, or its partition lags by
    more than the park limit: logged as an error)."""
    if record.op in (MOVE, HANDOVER) or record.resource_type == "Patient":
        return False
    awaited = _awaited(patients, record.patient_key, record.site)
    if not any(m.split("|", 1)[0] == record.target for m in awaited):
        return False
    barrier = barrier_of(record.site, record.patient_key)
    overdue = {m for m, since in _pending(awaited).items() if since + limit_ms <= now_ms}
    if overdue and not state.parked.get(barrier):
        log.error(
            "%s's records at Patient/%s waited %ds for a hand-over that never came (%s); they go on without it",
            record.site,
            record.patient_key,
            limit_ms // 1000,
            ", ".join(sorted(overdue)),
        )
        awaited = {m: w for m, w in awaited.items() if m not in overdue}
        _set_awaited(patients, record.patient_key, record.site, awaited)
        if not _pending(awaited):
            return False
    hold(state, record, barrier, now_ms, partition)
    return True


def lift_expired_barrier(
    patients: MutableMapping[str, dict[str, Any]], park_key: str, now_ms: int, limit_ms: int
) -> str | None:
    """For a park key that expired: if it is a hand-over's (`barrier_of`), stop waiting for the hand-overs awaited
    longer than `limit_ms` and return what it waited for (for the dead letters' reason); None for any other park
    key. One awaited for less time (a later review's) is still awaited."""
    if not park_key.startswith(_BARRIER):
        return None
    site, here = park_key[len(_BARRIER) :].rsplit("|", 1)
    awaited = _awaited(patients, here, site)
    pending = _pending(awaited)
    overdue = sorted(m for m, since in pending.items() if since + limit_ms <= now_ms)
    _set_awaited(patients, here, site, {m: w for m, w in awaited.items() if m not in overdue})
    moves = ", ".join(overdue or sorted(pending)) or "none any more"
    return f"the hand-over of {site}'s records from an identity move to Patient/{here} (awaited: {moves})"


def is_handover(record: RoutedResource) -> bool:
    """Whether a record is a hand-over (`handover_records`)."""
    return record.op == HANDOVER


def take_over(
    state: OrderState,
    patients: MutableMapping[str, dict[str, Any]],
    handover: RoutedResource,
    now_ms: int,
    partition: int = 0,
) -> MoveOrder:
    """The new Patient's partition takes over what the previous one released of the site: records parked here
    for any of it are released (for the sink), or sent on if their site's records moved on again meanwhile. If
    the site's records moved on from this Patient before the hand-over came (a review after the one it
    follows), it is handed on to the Patient they moved to. A notice (`handover_notice`) makes the site's records
    here wait for the hand-over it names; its last record releases them, in their order, once none other is
    awaited."""
    assert handover.resource is not None
    body = orjson.loads(handover.resource)
    here, site = handover.patient_key, handover.site
    if "notice" in body:  # from the identity stage: a hand-over is coming; the site's records here wait for it
        _expect(patients, handover, now_ms)
        return MoveOrder([], [], [])
    released, positions = body.get("released") or {}, body.get("positions") or {}
    last, awaiting = bool(body.get("last", True)), body.get("awaiting") or {}
    onward = ((patients.get(here) or {}).get("moved") or {}).get(site)
    if onward is not None:
        at, to = f"Patient/{here}", f"Patient/{onward}"
        entries = {ref: {**e, "deps": _repointed_refs(e.get("deps", []), at, to)} for ref, e in released.items()}
        request = {"to": onward, "holder": body.get("holder"), "move": body.get("move")}
        ahead = replace(handover, op=MOVE, target_id=here, patient_key=here, resource=orjson.dumps(request).decode())
        return MoveOrder([], [], handover_records(ahead, entries, positions, last=last, awaiting=awaiting))
    to_sink, redirected, stale = [], [], []

    def place(item: RoutedResource) -> None:
        if (elsewhere := redirect(patients, item)) is None:
            to_sink.append(item)
        else:
            redirected.append(elsewhere)

    for item in adopt_released(state, released, positions, now_ms, partition):
        place(item)
    if last and _handed(patients, handover, body.get("move"), awaiting):
        # What waited for the hand-over goes on, in its order, as the order stage takes a record.
        for record in take_parked(state, barrier_of(site, here)):
            if is_stale(state, record):  # older than a change of its row handed over, or taken here before it
                stale.append(record)
                continue
            for item in order_record(state, record, now_ms, partition):  # (no Patient version waits)
                place(item)
    return MoveOrder(to_sink, redirected, [], tuple(stale))


def _repointed_refs(refs: list[str], previous: str, new: str) -> list[str]:
    """References (Type/id) with the previous Patient's made the new one's, in their order."""
    return [new if ref == previous else ref for ref in refs]


def redirect(patients: Mapping[str, dict[str, Any]], record: RoutedResource) -> RoutedResource | None:
    """A record of a site whose records moved away from its Patient (order_move's note), bound for the new
    Patient instead: its references to the previous one rewritten, keyed by the new one. None for any other
    record, and for Patients and MOVEs themselves."""
    if record.resource_type == "Patient" or record.op == MOVE:
        return None
    to = ((patients.get(record.patient_key) or {}).get("moved") or {}).get(record.site)
    if to is None:
        return None
    previous = record.patient_key
    body, digest = None, record.content_hash
    if record.resource is not None:
        original = orjson.loads(record.resource)
        resource = _repointed(original, previous, str(to)) or original
        body, digest = orjson.dumps(resource).decode(), canonical_hash(resource)
    dependencies = sorted(set(_repointed_refs(record.dependencies, f"Patient/{previous}", f"Patient/{to}")))
    return replace(record, patient_key=str(to), resource=body, content_hash=digest, dependencies=dependencies)
