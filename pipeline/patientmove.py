"""Moving a site's resources from one central Patient to another, after an accepted identity review.

When a reviewer accepts that a hospital's patient is the person its Patient now names (`cdrsync identity
accept`, pipeline/identity.py), the records the hospital sent before the change are at the central Patient it
had. Left there, the person of the previous identifier would show another person's results, and the person
now named would miss them. So the identity stage asks for a move: a record with op MOVE (`move_request`),
keyed by the previous Patient, through the order stage (which takes the site out of that Patient,
pipeline/merge.py, so the Patient is updated without the site's identifiers, or deleted when no hospital
holds it any more, after the move) to the sink, which calls `move_site_records`:

* the Patient now named must be written already (else RetryableError: the move comes back through the retry
  tiers; the accepted Patient version is on its way in its own partition);
* every resource of the site (by its origin tag) in the previous Patient's compartment (`$everything`) is
  read and written again with its references to the previous Patient pointing at the one now named, over
  the version read (If-Match). Only references change: the content is the hospital's, and the content hash
  stays. A resource exactly as cdrsync wrote it gets its written-by mark again (pipeline/sink.py), so it
  stays recognisably cdrsync's; one edited at the target since keeps its old mark, so a later change from
  the hospital is still a conflict for review, never a silent overwrite of that edit;
* the compartment is read again until no resource of the site is left there (a resource changed between
  reading and writing is read again: RetryableError after three rounds). Each step is idempotent, so a move
  repeated after a crash or a retry finds less to do, and finally nothing.

Limits: the target cannot tell two local patients of one hospital apart once both are at one central Patient
(a duplicate record at the hospital, both with the same insurance number): all of that site's resources
there move. A record of that patient still on its way to the previous Patient when the review was accepted
(parked for a reference, or in the retry topics) is written there after the move; `cdrsync identity show`
lists what of the site is still at the previous Patient.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from .errors import RejectedByTargetError, RetryableError, VersionConflictError
from .fhirclient import FhirClient, WriteOutcome
from .ids import ORIGIN_TAG_SYSTEM
from .merge import merge_patient
from .ordering import OrderState, order_record
from .provenance import provenance_id
from .records import NormalizedResource, RoutedResource
from .references import logical_system, map_references, relative_reference
from .sink import Versions, remarked, untouched_write

__all__ = [
    "MOVE",
    "MoveOutcome",
    "everything_of_site",
    "move_request",
    "move_site_records",
    "moved_to",
    "order_move",
    "rewritten",
]

MOVE = "MOVE"
_ROUNDS = 3
_SKIPPED = ("Patient", "Provenance")  # the Patient itself; Provenances point at the resources, which keep their ids


@dataclass(frozen=True)
class MoveOutcome(WriteOutcome):
    """What a move did: the resources moved, and those of them edited at the target since cdrsync wrote them."""

    moved: list[str] = field(default_factory=list)
    edited: list[str] = field(default_factory=list)


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


def rewritten(resource: dict[str, Any], previous_key: str, new_key: str) -> dict[str, Any] | None:
    """The resource with its references to Patient/previous_key pointing at Patient/new_key, re-marked when
    it is exactly as cdrsync wrote it; None when it does not reference Patient/previous_key."""
    changed = False

    def to_new(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
        nonlocal changed
        if relative_reference(reference) != ("Patient", previous_key):
            return None
        changed = True
        return {**node, "reference": f"Patient/{new_key}"}

    body = map_references({k: v for k, v in resource.items() if k != "meta"}, to_new)
    if not changed:
        return None
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k in ("tag", "source", "profile", "security")}
    return remarked(resource, {**body, "meta": meta} if meta else body)


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
    client: FhirClient, record: RoutedResource, versions: Versions | None = None
) -> MoveOutcome:
    """Carry out a MOVE record (see the module docstring); done only once a listing of the previous Patient's
    compartment finds nothing of the site to move. `versions` (the sink's table of the versions it wrote) gets
    each moved resource's new version."""
    previous_key, new_key, site = record.target_id, moved_to(record), record.site
    await _check_destination(client, record, new_key)
    moved: list[str] = []
    edited: list[str] = []
    for _ in range(_ROUNDS):
        changed_meanwhile, to_move = [], 0
        for ref in await everything_of_site(client, previous_key, site):
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
            if versions is not None and outcome.version_id is not None:
                versions[ref] = {"version": outcome.version_id}
            moved.append(ref)
            if untouched_write(current) is None:
                edited.append(ref)  # not re-marked: edited at the target since cdrsync wrote it
        if to_move == 0:
            return MoveOutcome(200, None, moved, edited)
    raise RetryableError(
        f"{site}'s resources at Patient/{previous_key} kept changing while being moved to Patient/{new_key} "
        f"({_ROUNDS} rounds; moved {len(moved)}, e.g. {(changed_meanwhile or moved or ['?'])[0]} changed)"
    )


async def _check_destination(client: FhirClient, record: RoutedResource, new_key: str) -> None:
    """The Patient moved to must be written, and must hold the site's local patient: a move that a later review
    overtook (the hospital changed the identifier back, and that was accepted too) must not move anything."""
    patient = await client.read("Patient", new_key)
    if patient is None:
        where = f"{record.site}'s records at Patient/{record.target_id}"
        raise RetryableError(f"Patient/{new_key} is not written yet: {where} move after it")
    holder = str(orjson.loads(record.resource or "{}").get("holder") or record.source_id)
    local = {"system": logical_system(record.site, "Patient"), "value": holder}
    if not any(
        isinstance(i, dict) and (i.get("system"), i.get("value")) == (local["system"], local["value"])
        for i in patient.get("identifier") or []
    ):
        raise RetryableError(
            f"Patient/{new_key} does not hold {record.site}'s patient {holder} (not written yet, or a later "
            f"identity review took it elsewhere): {record.site}'s records at Patient/{record.target_id} are not moved"
        )


def order_move(
    state: OrderState,
    patients: MutableMapping[str, dict[str, Any]],
    move: RoutedResource,
    now_ms: int,
    partition: int = 0,
) -> list[RoutedResource]:
    """The order stage's part of a MOVE: the MOVE itself, then the previous Patient without the site: updated,
    with the site's Provenance of it deleted, or deleted with every Provenance of it when no hospital holds it
    any more. The sink writes them in this order, one after the other (MOVE and Patient are both
    Patient/previous_key), so the Patient loses the site only once nothing of the site references it.

    When it is deleted, the resources released as referencing it are taken to be the site's, moved: they are
    noted as referencing the new Patient, so that the delete does not wait for them (anything else still
    referencing it at the target makes the target refuse the delete: a dead letter naming it, for review).
    A site no longer in the previous Patient (a MOVE sent again: after a crash, or by `cdrsync identity move`
    for what reached it after the first) leaves it unchanged: only the MOVE goes on."""
    previous, new = f"Patient/{move.target_id}", f"Patient/{moved_to(move)}"
    if move.site not in (patients.get(move.target_id) or {}).get("sites", []):
        return [move]
    leaving = merge_patient(patients, replace(move, op="DELETE", resource=None))
    if not leaving.is_delete:
        provenance = provenance_id(move.site, previous)
        gone = replace(move, resource_type="Provenance", target_id=provenance, op="DELETE", resource=None)
        return [move, *order_record(state, leaving, now_ms, partition), gone]
    for ref in state.referrers.pop(previous, []):
        entry = state.released.get(ref)
        if entry is not None and previous in entry.get("deps", []):
            state.released[ref] = {**entry, "deps": [new if d == previous else d for d in entry["deps"]]}
    return [move, *order_record(state, leaving, now_ms, partition)]
