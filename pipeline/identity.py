"""Stage 2: a normalized resource → one RoutedResource per route, in target ids, keyed by patient.

A patient is matched across sites by the shared identifier each site declares (DESIGN.md decision 4):
the global patient key, and so the central Patient's id, is uuid5 over that identifier's system and
value, so the same person sent by two hospitals is one Patient.

This stage reads fhir.normalized.v1, keyed by site-local patient, and keeps two tables for its
partition:
  patient_key_by_local_patient   "site|local id" → {"key": global key}
  held_by_local_patient          "site|local id" → records waiting for that patient's shared identifier
A record whose patient has no known shared identifier is held (never written without it, never
dropped) and released, in arrival order, when the Patient arrives with it. A Patient whose shared
identifier changes (or disappears) is not applied: it goes to identity review, because moving a
record from one person to another is a clinical decision, not a sync step. Until a person decides
(`cdrsync identity accept|reject`, which reaches this stage as a decision record on the normalized topic,
in the patient's partition), every later record of that local patient is held as well, so nothing goes
to either person in the meantime. Accepting also moves what the hospital sent before the change from the
previous central Patient to the one now named (a MOVE record for the order stage and the sink,
pipeline/patientmove.py). A hospital merging two of its records of one person (an HL7 v2 ADT^A40) sends the
merged record's Patient with `link` replaced-by the surviving record, under the surviving record's identifiers
(its own marked `old`): never applied to a central Patient itself, it moves the merged record's patient like
an identifier change (a review when the central Patient differs); a merge that does not say where the patient
is now is a dead letter (IdentityMergeError).

A local patient's entry in patient_key_by_local_patient:
  {"key": K}                    its records go to the central Patient K
  {"key": K, "review": {"proposed": P, "number": n}}
                                its Patient now names P (None: no identifier): all its records are held
  {"key": K, "rejected": P}     a reviewer kept K: Patient versions naming P ("-": none) are not applied
  {}                            a reviewer accepted that it has no identifier: held as any patient without
and "reviews": n, how many reviews it has had (each review record and its closing name their number).
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from .backflow import central_record, echo_targets
from .config import Route, SiteConfig
from .errors import EnvelopeError, PermanentError
from .ids import (
    CDRSYNC_SOURCE_PREFIX,
    ORIGIN_TAG_SYSTEM,
    SERVER_META,
    global_patient_key,
    shared_identifier,
    target_id,
)
from .patientmove import move_request
from .records import NormalizedResource, RoutedResource, canonical_hash, decode, encode
from .references import logical_system, rewrite_references
from .trigger import TRIGGER_ALL

__all__ = [
    "DECISION_HEADER",
    "NO_KEY",
    "ORIGIN_TAG_SYSTEM",
    "PREVIOUS_KEY_HEADER",
    "PROPOSED_KEY_HEADER",
    "REASON_HEADER",
    "REVIEW_NUMBER_HEADER",
    "IdentityDecision",
    "IdentityDecisionError",
    "IdentityMergeError",
    "IdentityOutcome",
    "IdentityState",
    "Review",
    "apply_decision",
    "carries_decision",
    "global_patient_key",
    "local_patient",
    "merged_into",
    "moving_targets",
    "parse_decision",
    "refusal_key",
    "resolve_identity",
    "route_resource",
    "shared_identifier",
    "to_target_form",
]


def local_patient(record: NormalizedResource) -> str | None:
    """ "site|local patient id" of the patient a record belongs to, None if it names no patient."""
    if not record.patient_ref:
        return None
    return f"{record.site}|{record.patient_ref.removeprefix('Patient/')}"


PatientKeys = Callable[[str], "str | None"]
REASON_HEADER = "cdrsync-reason"  # on a held or review record: why it waits
DECISION_HEADER = "cdrsync-identity-decision"  # JSON: action, proposed key, by, reason, at_ms
NO_KEY = "-"  # the proposed key of a Patient that lost its shared identifier, as headers name it
PREVIOUS_KEY_HEADER = "cdrsync-previous-patient-key"  # on a review record: the key its patient had
PROPOSED_KEY_HEADER = "cdrsync-proposed-patient-key"  # on a review record: the key its Patient now names
REVIEW_NUMBER_HEADER = "cdrsync-review-number"  # on a review record: which review of its local patient it is


class IdentityMergeError(PermanentError):
    """A merge (a Patient replaced by another record of its hospital) that names no shared identifier: where the
    merged record's patient is now cannot be told."""

    error_class = "identity_merge"


def merged_into(patient: dict[str, Any]) -> str | None:
    """The local id of the record a Patient was merged into (`link` of type replaced-by), None if it was not."""
    for link in patient.get("link") or []:
        if isinstance(link, dict) and link.get("type") == "replaced-by":
            reference = str((link.get("other") or {}).get("reference") or "")
            if reference.startswith("Patient/"):
                return reference.removeprefix("Patient/")
    return None


def _current(patient: dict[str, Any]) -> dict[str, Any]:
    """A merged Patient with only its current identifiers (the surviving record's): its own earlier ones (`old`)
    do not say where its records belong now."""
    return {**patient, "identifier": [i for i in patient.get("identifier") or [] if i.get("use") != "old"]}


class IdentityDecisionError(PermanentError):
    """A reviewer's decision that does not fit the review open now (decided already, or superseded)."""

    error_class = "identity_decision"


@dataclass(frozen=True)
class IdentityDecision:
    """`cdrsync identity accept|reject` on one local patient's open review."""

    action: str  # "accept": the Patient is the person it now names; "reject": it stays the person it was
    review: int  # which review of the local patient it decides (the reviewer saw that one)
    previous: str  # the global key the patient had when the review opened
    proposed: str | None  # the global key the review proposed (None: the identifier disappeared)
    by: str
    reason: str
    at_ms: int

    def header(self) -> bytes:
        return orjson.dumps(
            {
                "action": self.action,
                "review": self.review,
                "previous": self.previous,
                "proposed": self.proposed or NO_KEY,
                "by": self.by,
                "reason": self.reason,
                "at_ms": self.at_ms,
            }
        )


def refusal_key(local: str, decision: IdentityDecision | None) -> str:
    """Where the identity stage answers a decision it refused, on the resolutions topic (beside the closings,
    which are keyed by the local patient alone); a decision it could not even read: under "malformed"."""
    return f"refused|{decision.at_ms if decision else 'malformed'}|{local}"


def carries_decision(headers: list[tuple[str, bytes]]) -> bool:
    return any(name == DECISION_HEADER for name, _ in headers)


def parse_decision(headers: list[tuple[str, bytes]]) -> IdentityDecision | None:
    """The decision a normalized record carries, None for an ordinary change."""
    for name, value in headers:
        if name != DECISION_HEADER:
            continue
        try:
            d = orjson.loads(value)
            decision = IdentityDecision(
                str(d["action"]),
                int(d["review"]),
                str(d["previous"]),
                None if d["proposed"] == NO_KEY else str(d["proposed"]),
                str(d["by"]),
                str(d["reason"]),
                int(d["at_ms"]),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise EnvelopeError(f"malformed {DECISION_HEADER} header: {error}") from None
        if decision.action not in ("accept", "reject"):
            raise EnvelopeError(f"malformed {DECISION_HEADER} header: action {decision.action!r}")
        return decision
    return None


@dataclass
class IdentityState:
    """The identity stage's tables (Faust tables in the worker, dicts in tests)."""

    keys: MutableMapping[str, dict[str, Any]]
    held: MutableMapping[str, list[str]]


class Review(NamedTuple):
    """A Patient version whose shared identifier changed: what the review topic gets."""

    record: NormalizedResource
    reason: str
    previous_key: str
    proposed_key: str | None
    number: int  # the local patient's reviews so far, this one included

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (REASON_HEADER, self.reason.encode()),
            (PREVIOUS_KEY_HEADER, self.previous_key.encode()),
            (PROPOSED_KEY_HEADER, (self.proposed_key or NO_KEY).encode()),
            (REVIEW_NUMBER_HEADER, str(self.number).encode()),
        ]


@dataclass
class IdentityOutcome:
    """What one normalized record led to."""

    routed: list[RoutedResource] = field(default_factory=list)
    held: list[tuple[NormalizedResource, str]] = field(default_factory=list)  # (record, reason)
    review: list[Review] = field(default_factory=list)
    not_applied: list[tuple[NormalizedResource, str]] = field(default_factory=list)  # a reviewer rejected them
    released: int = 0  # held records released by this one
    released_records: list[RoutedResource] = field(default_factory=list)
    moves: list[RoutedResource] = field(default_factory=list)  # an accepted review: the records before it move
    closed: dict[str, Any] | None = None  # a review this record closed: what the resolutions topic keeps

    def merge(self, other: IdentityOutcome) -> None:
        self.routed += other.routed
        self.held += other.held
        self.review += other.review
        self.not_applied += other.not_applied
        self.released += other.released
        self.released_records += other.released_records


def _pop_held(state: IdentityState, local: str) -> list[NormalizedResource]:
    """The records held for a local patient, in their order, taken out of the table."""
    return [decode(bytes.fromhex(item), NormalizedResource) for item in state.held.pop(local, [])]


def _hold(state: IdentityState, local: str, record: NormalizedResource, reason: str, out: IdentityOutcome) -> None:
    state.held[local] = [*state.held.get(local, []), encode(record).hex()]
    out.held.append((record, reason))


def resolve_identity(state: IdentityState, record: NormalizedResource, site: SiteConfig) -> IdentityOutcome:
    """Route a record under its global patient key, or hold it until its patient has one."""
    out = IdentityOutcome()
    if site.capture is not None:  # central's own change: its ids are global already (pipeline/backflow.py)
        out.routed = [central_record(record)]
        return out
    local = local_patient(record)
    if local is None:  # not about a patient (e.g. a Flag on a Location): keyed by itself
        out.routed = route_resource(record, site, lambda _: None)
        return out
    _resolve_local(state, local, record, site, out)
    return out


def _resolve_local(
    state: IdentityState, local: str, record: NormalizedResource, site: SiteConfig, out: IdentityOutcome
) -> None:
    entry = state.keys.get(local, {})
    if record.resource_type == "Patient" and not record.is_delete and record.source_lsn is not None:
        row, last = (entry.get("lsn") or [None, None])[:2]
        if row == record.source_id and last is not None and record.source_lsn < last:
            # Read again (a batch processed twice after a restart): taken for the hospital's current version, an
            # older identifier would withdraw an open review and release the held records to the old patient.
            # Only versions of one source row are compared: a row's changes reach the WAL in commit order, those
            # of two rows (two HL7 v2 messages) need not.
            why = f"an older version of {local} (source LSN {record.source_lsn}) read again after LSN {last}"
            out.not_applied.append((record, why))
            return
        entry = {**entry, "lsn": [record.source_id, record.source_lsn]}
        if local in state.keys:
            state.keys[local] = entry
    known, review = entry.get("key"), entry.get("review")
    survivor = None  # for a merged record's Patient: the local id of the record it was merged into
    if record.resource_type == "Patient" and not record.is_delete:
        assert site.identity is not None and record.resource is not None
        shared = site.identity
        body = orjson.loads(record.resource)
        survivor = merged_into(body)
        key = shared.patient_key(_current(body) if survivor else body)
        if survivor is not None:
            _check_merge(local, site, survivor, body, key, known is not None or local in state.held)
        if review is not None and key == known:  # the hospital took the change back before anyone decided
            _close_review(state, local, _with(entry, key=known), "withdrawn", site, out, last=record)
            return
        if known is not None and key != known:
            if review is None and (key or NO_KEY) == entry.get("rejected") and survivor is None:
                why = f"names patient key {key}, which identity review rejected for {local}"
                out.not_applied.append((record, why))
                return
            if review is None or key != review["proposed"]:  # a change, or a different change again
                _open_review(state, local, entry, record, key, survivor, out)
            _hold(state, local, record, f"patient under identity review: patient key {known} -> {key}", out)
            return
        if key is None:
            _hold(state, local, record, f"Patient has no {shared.shared_identifier_system} identifier", out)
            return
        if key != known or "rejected" in entry:
            state.keys[local] = _with(entry, key=key)
        known = key
    if record.resource_type == "Patient" and known is None:  # a delete: the Patient never had a shared identifier
        _drop_held(state, local, record, out)
        return
    if review is not None:  # nothing of this patient goes anywhere until a person has decided who it is
        _hold(state, local, record, f"patient under identity review: patient key {known} -> {review['proposed']}", out)
        return
    waiting = local in state.held and record.resource_type != "Patient"
    if known is None or waiting:  # unknown patient, or its earlier records still wait: keep their order
        _hold(state, local, record, "patient has no shared identifier yet", out)
        return
    if survivor is not None:
        # A merged record: its patient is the surviving record's, whose own Patient the central one keeps.
        out.not_applied.append((record, f"{local} was merged into {site.site}|{survivor} at the hospital"))
    else:
        out.routed += route_resource(record, site, _keys_of(state, site.site))
    if record.resource_type == "Patient":
        _release_held(state, local, site, out)


def _survivor(record: NormalizedResource) -> str | None:
    return merged_into(orjson.loads(record.resource)) if record.resource else None


def _check_merge(
    local: str, site: SiteConfig, survivor: str, body: dict[str, Any], key: str | None, seen: bool
) -> None:
    """A merged record must say where its patient is now: the surviving record's identifiers as its current
    ones (the shared one among them) and its own as `old` (as the HL7 v2 adapter writes an ADT^A40), and it
    must be a record cdrsync has received. Else nothing can tell which central Patient its records belong to:
    an IdentityMergeError (a dead letter, for review), never a guess."""
    assert site.identity is not None
    merge = f"{local} was merged into {site.site}|{survivor} at the hospital"
    if not any(isinstance(i, dict) and i.get("use") == "old" for i in body.get("identifier") or []):
        raise IdentityMergeError(
            f"{merge}, but its Patient does not mark its own identifiers `old`: it cannot be told whether its "
            f"{site.identity.shared_identifier_system} is its own or the surviving record's"
        )
    if key is None:
        raise IdentityMergeError(
            f"{merge}, and the merge names no {site.identity.shared_identifier_system} of the surviving record: "
            "where its records belong is not known"
        )
    if not seen:
        raise IdentityMergeError(f"{merge}, but cdrsync never received {local}: the merge names an unknown record")


def _with(entry: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A local patient's entry after a change: its count of reviews and the source row and LSN of its latest
    Patient version kept, review and rejection only if given."""
    kept: dict[str, Any] = {name: entry[name] for name in ("reviews", "lsn") if name in entry}
    return {**kept, **{name: value for name, value in fields.items() if value is not None}}


def _open_review(
    state: IdentityState,
    local: str,
    entry: dict[str, Any],
    record: NormalizedResource,
    key: str | None,
    survivor: str | None,
    out: IdentityOutcome,
) -> None:
    number = int(entry.get("reviews", 0)) + 1  # names the review: `cdrsync identity list` matches closings to it
    review = {"proposed": key, "number": number}
    state.keys[local] = {**_with(entry, key=entry["key"]), "reviews": number, "review": review}
    what = f"{local} was merged into {record.site}|{survivor}" if survivor else f"shared identifier of {local} changed"
    reason = f"{what}: patient key {entry['key']} -> {key}"
    out.review.append(Review(record, reason, entry["key"], key, number))


def _drop_held(state: IdentityState, local: str, deleted: NormalizedResource, out: IdentityOutcome) -> None:
    """The hospital deleted a Patient that never had a shared identifier: nothing of it was sent, and what waits
    for it is not released to whoever is given that local id next."""
    reason = f"{local} was deleted at the hospital before it had a shared identifier: never sent"
    out.not_applied += [(held, reason) for held in _pop_held(state, local)]
    out.not_applied.append((deleted, reason))


def apply_decision(
    state: IdentityState, record: NormalizedResource, site: SiteConfig, decision: IdentityDecision
) -> IdentityOutcome:
    """A reviewer's decision on the open review of the record's local patient: the held records go on,
    under the key decided (accept: the one the Patient now names; reject: the one it had)."""
    local = local_patient(record)
    entry = state.keys.get(local or "", {})
    review = entry.get("review")
    if local is None or review is None:
        raise IdentityDecisionError(f"no identity review is open for {local}: it was decided or withdrawn already")
    if (review["number"], review["proposed"], entry["key"]) != (decision.review, decision.proposed, decision.previous):
        raise IdentityDecisionError(
            f"the identity review of {local} is now review {review['number']}, patient key {entry['key']} -> "
            f"{review['proposed']}, not review {decision.review}, {decision.previous} -> {decision.proposed}: "
            "the hospital changed it since; decide on the current one"
        )
    out = IdentityOutcome()
    if decision.action == "accept":
        _close_review(state, local, _with(entry, key=review["proposed"]), "accepted", site, out, decision=decision)
        if review["proposed"] is not None:  # what the hospital sent before the change goes to that person too
            holder = out.closed["holder"] if out.closed else record.source_id
            out.moves = [
                move_request(record, target, entry["key"], review["proposed"], decision.at_ms, holder)
                for target in moving_targets(site)
            ]
    else:
        after = _with(entry, key=entry["key"], rejected=review["proposed"] or NO_KEY)
        _close_review(state, local, after, "rejected", site, out, decision=decision)
    return out


def moving_targets(site: SiteConfig) -> list[str]:
    """The targets an accepted review moves the site's earlier records at: those its Patients go to, on routes
    that carry everything. (A `tumorboard-flag` route sent them because a flag was set under the previous
    Patient: under the one now named nothing is sent before the hospital flags the patient again, so the
    records sent stay where they are, and `cdrsync identity show` lists them.)"""
    return sorted({r.target for r in site.routes if "Patient" in _carried(site, r) and r.trigger == TRIGGER_ALL})


def _close_review(
    state: IdentityState,
    local: str,
    after: dict[str, Any],
    action: str,
    site: SiteConfig,
    out: IdentityOutcome,
    *,
    last: NormalizedResource | None = None,
    decision: IdentityDecision | None = None,
) -> None:
    """Set the local patient's entry, then take its held records again, in their order, under it.

    Only the newest held version of the Patient is taken again (last, if it closed the review): the versions
    before it are superseded, and each would otherwise be judged afresh, an older identifier included.
    """
    entry = state.keys[local]
    state.keys[local] = after
    held = _pop_held(state, local)
    versions = [n for n, r in enumerate(held) if r.resource_type == "Patient" and not r.is_delete]
    newest = versions[-1] if versions and last is None else None
    applied = last or (held[newest] if newest is not None else None)
    # The local patient whose Patient the central one now named holds: the surviving record's, for a merge.
    holder = (_survivor(applied) if applied else None) or local.split("|", 1)[1]
    for n in versions:
        if n != newest:
            out.not_applied.append((held[n], f"a version of {local}'s Patient superseded while under identity review"))
    held = [r for n, r in enumerate(held) if n not in versions or n == newest] + ([last] if last else [])
    for record in held:
        again = IdentityOutcome()
        _resolve_local(state, local, record, site, again)
        out.merge(again)
        if again.routed and not again.held:
            out.released += 1
            out.released_records += again.routed
    out.closed = {
        "local_patient": local,
        "review_number": entry["review"]["number"],
        "action": action,
        "previous_key": entry["key"],
        "proposed_key": entry["review"]["proposed"],
        "key": after.get("key"),
        "by": decision.by if decision else local.split("|", 1)[0],
        "reason": decision.reason if decision else "the hospital's Patient names its previous identifier again",
        "decided_ms": decision.at_ms if decision else None,
        "holder": holder,
    }


def _keys_of(state: IdentityState, site: str) -> PatientKeys:
    """Global key of a site's local patient id, None if unknown."""

    def key_of(local_id: str) -> str | None:
        key: str | None = state.keys.get(f"{site}|{local_id}", {}).get("key")
        return key

    return key_of


def _release_held(state: IdentityState, local: str, site: SiteConfig, out: IdentityOutcome) -> None:
    waiting = _pop_held(state, local)
    keys = _keys_of(state, site.site)
    for held in waiting:
        if held.resource_type == "Patient" and not held.is_delete:
            continue  # an older version of the Patient, superseded by the one that released them
        released = route_resource(held, site, keys)
        out.routed += released
        out.released_records += released
        out.released += 1


def _carried(site: SiteConfig, route: Route) -> frozenset[str]:
    return frozenset(route.resource_types or site.resource_types)


def _with_source_identifier(resource: dict[str, Any], site: str, source_id: str) -> dict[str, Any]:
    """Keep the source id as an identifier (QuestionnaireResponse.identifier is 0..1, the rest 0..*)."""
    own = {"system": logical_system(site, resource["resourceType"]), "value": source_id}
    current = resource.get("identifier")
    if resource["resourceType"] == "QuestionnaireResponse":
        return resource if current else {**resource, "identifier": own}
    identifiers = list(current or [])
    if not any(i.get("system") == own["system"] for i in identifiers if isinstance(i, dict)):
        identifiers.append(own)
    return {**resource, "identifier": identifiers}


def _with_origin_meta(resource: dict[str, Any], site: str) -> dict[str, Any]:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in SERVER_META}
    tags = [t for t in meta.get("tag", []) if t.get("system") != ORIGIN_TAG_SYSTEM]
    meta["tag"] = [*tags, {"system": ORIGIN_TAG_SYSTEM, "code": site}]
    meta["source"] = f"{CDRSYNC_SOURCE_PREFIX}{site}"
    return {**resource, "meta": meta}


def _target_ids(site: str, patient_keys: PatientKeys) -> Callable[[str, str], str | None]:
    """Target id of a site's reference: Patients by their global key, everything else by site and id."""

    def to_target(resource_type: str, source_id: str) -> str | None:
        if resource_type == "Patient":
            return patient_keys(source_id)
        return target_id(site, resource_type, source_id)

    return to_target


def to_target_form(
    resource: dict[str, Any], site: str, carried: frozenset[str], patient_keys: PatientKeys
) -> tuple[dict[str, Any], frozenset[str]]:
    """The resource as the target stores it, and the target references it depends on."""
    source_id = resource["id"]
    to_target = _target_ids(site, patient_keys)
    rewritten = rewrite_references(resource, site, carried, to_target)
    body = _with_origin_meta(_with_source_identifier(rewritten.resource, site, source_id), site)
    own_id = to_target(resource["resourceType"], source_id)
    assert own_id is not None, "a Patient is routed only once its global key is known"
    body["id"] = own_id
    return body, rewritten.dependencies


def route_resource(record: NormalizedResource, site: SiteConfig, patient_keys: PatientKeys) -> list[RoutedResource]:
    """One RoutedResource per route of the site that carries the record's type."""
    routed = []
    local_patient_id = (record.patient_ref or "").removeprefix("Patient/")
    own_id = _target_ids(site.site, patient_keys)(record.resource_type, record.source_id)
    patient_key = (patient_keys(local_patient_id) if local_patient_id else None) or own_id
    assert own_id is not None and patient_key is not None
    echoes = echo_targets(record.resource)
    for route in site.routes:
        carried = _carried(site, route)
        if record.resource_type not in carried or route.target in echoes:
            continue  # not carried, or written here by cdrsync from that very target: never echoed back
        body, digest, dependencies = None, None, frozenset[str]()
        if record.resource is not None:
            form, dependencies = to_target_form(orjson.loads(record.resource), site.site, carried, patient_keys)
            body, digest = orjson.dumps(form).decode(), canonical_hash(form)
        routed.append(
            RoutedResource.of(
                record,
                site=site.site,
                target=route.target,
                target_id=own_id,
                patient_key=patient_key,
                resource=body,
                content_hash=digest,
                dependencies=sorted(dependencies),
            )
        )
    return routed
