"""`cdrsync identity`: the patients whose shared identifier changed, and a reviewer's decision on each.

When a hospital's Patient names another shared identifier than before (or none), the identity stage
(pipeline/identity.py) does not move the patient: it copies that Patient version to the review topic and
holds every later record of that local patient. A reviewer then decides, for the local patient:

* `accept`: the Patient is the person it now names. The held records go to that central Patient; so do
  the hospital's later ones, and the worker moves the records written before the change there from the
  previous central Patient (pipeline/patientmove.py).
* `reject`: the Patient stays the person it was. The held records go to the previous central Patient;
  Patient versions naming the rejected identifier are not applied (audited) until the hospital corrects it.

The decision travels as a record on the normalized topic, keyed like that patient's changes (so in their
partition, after the ones already held), carrying the Patient version reviewed and a decision header. The
identity stage checks that the review it names is still the open one (the hospital may have changed the
identifier again, or taken the change back), applies it, and records how the review closed on a compacted
topic, which `list` reads. Dry run unless --execute.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .config import Config, SiteConfig
from .dlq import iso_time, operator_name, read_all, resolutions
from .errors import CdrsyncError
from .fhirclient import FhirClient
from .identity import (
    DECISION_HEADER,
    NO_KEY,
    PREVIOUS_KEY_HEADER,
    PROPOSED_KEY_HEADER,
    REASON_HEADER,
    REVIEW_NUMBER_HEADER,
    IdentityDecision,
    refusal_key,
)
from .kafkaadmin import AcknowledgedProducer
from .patientmove import everything_of_site
from .records import NormalizedResource, decode, encode

__all__ = [
    "IdentityReview",
    "decide",
    "moved_keys",
    "read_reviews",
    "request_move",
    "survivor_not_there",
    "wait_for_closing",
    "written_before",
]

_LEGACY_REASON = re.compile(r"patient key (\S+) -> (\S+)$")
_CLOSINGS = ("accepted", "rejected", "withdrawn")


@dataclass(frozen=True)
class IdentityReview:
    """The latest review record of one local patient, and how its review closed, if it did after it."""

    local_patient: str  # "site|local id"
    partition: int
    offset: int
    timestamp_ms: int
    value: bytes
    reason: str
    previous_key: str | None
    proposed_key: str | None
    versions: int  # records of this review (the change, and each different change the hospital made while open)
    closed: dict[str, Any] | None
    number: int | None = None  # which review of the local patient it is (None: written before reviews held)

    @property
    def site(self) -> str:
        return self.local_patient.split("|", 1)[0]

    @property
    def local_id(self) -> str:
        return self.local_patient.split("|", 1)[1]

    @property
    def status(self) -> str:
        return str(self.closed["action"]) if self.closed else "open"

    def summary(self) -> dict[str, Any]:
        """Ids, keys and status; no clinical content."""
        return {
            "site": self.site,
            "local_patient_id": self.local_id,
            "reviewed_at": iso_time(self.timestamp_ms),
            "previous_patient": f"Patient/{self.previous_key}" if self.previous_key else None,
            "proposed_patient": f"Patient/{self.proposed_key}" if self.proposed_key else None,
            "changes": self.versions,
            "review_number": self.number,
            "status": self.status,
            "closed": self.closed,
            "review_record": f"{self.partition}:{self.offset}",
        }

    def shown(self, with_patient_data: bool) -> dict[str, Any]:
        """For `show`: the Patient version under review only when asked for."""
        record = decode(self.value, NormalizedResource)
        patient = orjson.loads(record.resource) if record.resource else None
        return {
            **self.summary(),
            "reason": self.reason,
            "source_version": record.source_version,
            "patient": patient if with_patient_data else "<withheld: patient data; add --with-patient-data>",
        }


def _header(headers: list[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or []:
        if key == name:
            return value.decode()
    return None


def _key(text: str | None) -> str | None:
    return None if text in (None, NO_KEY, "None") else text


def read_reviews(bootstrap: str, config: Config) -> list[IdentityReview]:
    """One entry per local patient ever sent to review: its latest review record and, if it closed since,
    how (the compacted resolutions topic, written by the identity stage)."""
    closed = resolutions(bootstrap, config.topics.name("identity_resolved"))
    latest: dict[str, Any] = {}
    versions: dict[str, int] = {}
    for message in read_all(bootstrap, config.topics.name("identity_review")):
        local = (message.key() or b"").decode()
        if "|" not in local or message.value() is None:
            raise CdrsyncError(
                f"identity review record {message.partition()}:{message.offset()} has no site|local patient key"
            )
        latest[local] = message
        number = _header(message.headers(), REVIEW_NUMBER_HEADER)
        versions[f"{local}#{number}"] = versions.get(f"{local}#{number}", 0) + 1
    found = []
    for local, message in latest.items():
        headers = message.headers()
        reason = _header(headers, REASON_HEADER) or ""
        previous, proposed = _header(headers, PREVIOUS_KEY_HEADER), _header(headers, PROPOSED_KEY_HEADER)
        if previous is None and (legacy := _LEGACY_REASON.search(reason)):  # written before the keys had headers
            previous, proposed = legacy.groups()
        timestamp = message.timestamp()[1]
        number = _header(headers, REVIEW_NUMBER_HEADER)
        closing = closed.get(local)
        found.append(
            IdentityReview(
                local,
                message.partition(),
                message.offset(),
                timestamp,
                message.value(),
                reason,
                _key(previous),
                _key(proposed),
                versions[f"{local}#{number}"],
                closing if _closes(closing, number, timestamp) else None,
                int(number) if number else None,
            )
        )
    return sorted(found, key=lambda r: (r.timestamp_ms, r.local_patient))


def _closes(closing: dict[str, Any] | None, number: str | None, timestamp_ms: int) -> bool:
    """Whether the latest closing of a local patient's review closed the review record read (later reviews have
    higher numbers; a record from before they were numbered is compared by time)."""
    if closing is None or closing.get("action") not in _CLOSINGS:
        return False
    if number is not None and closing.get("review_number") is not None:
        return int(closing["review_number"]) >= int(number)
    return int(closing.get("at_ms") or 0) >= timestamp_ms


def decide(bootstrap: str, config: Config, review: IdentityReview, action: str, reason: str) -> IdentityDecision:
    """Send the decision to the identity stage, in the patient's partition of the normalized topic."""
    if review.closed is not None:
        raise CdrsyncError(
            f"the identity review of {review.local_patient} was {review.status} already "
            f"({iso_time(int(review.closed.get('at_ms') or 0))})"
        )
    if review.number is None or review.previous_key is None:
        raise CdrsyncError(
            f"the review of {review.local_patient} was recorded before reviews held a patient's records: its "
            "records went on to the Patient it had; the hospital's next version of the Patient opens a new review"
        )
    at_ms = int(time.time() * 1000)
    decision = IdentityDecision(
        action, review.number, review.previous_key, review.proposed_key, operator_name(), reason, at_ms
    )
    producer = AcknowledgedProducer(bootstrap)
    producer.produce(
        config.topics.name("normalized"),
        review.value,
        review.local_patient.encode(),
        headers=[(DECISION_HEADER, decision.header())],
    )
    producer.finish("decision")
    return decision


def wait_for_closing(
    bootstrap: str,
    config: Config,
    local_patient: str,
    decision: IdentityDecision,
    timeout: float,
    *,
    tick: Callable[[float], None] = lambda waited: None,
) -> dict[str, Any] | None:
    """The identity stage's answer to this decision: how the review closed, or why it refused it (action
    "refused"); None if none came within the timeout (the worker is down or behind)."""
    topic = config.topics.name("identity_resolved")
    started = time.monotonic()
    while True:
        answers = resolutions(bootstrap, topic)
        closing = answers.get(local_patient)
        if closing is not None and closing.get("decided_ms") == decision.at_ms:
            return closing
        refusal = answers.get(refusal_key(local_patient, decision))
        if refusal is not None:
            return refusal
        waited = time.monotonic() - started
        if waited >= timeout:
            return None
        tick(waited)
        time.sleep(min(2.0, max(0.0, timeout - waited)))


def moved_keys(review: IdentityReview) -> tuple[str, str]:
    """(previous, new) patient key of an accepted review of a new identifier: what a move moves between."""
    closed = review.closed or {}
    previous, new = closed.get("previous_key"), closed.get("key")
    if review.status != "accepted" or not previous or not new:
        raise CdrsyncError(
            f"the identity review of {review.local_patient} is {review.status}: only an accepted review of a new "
            "identifier moves a patient's records (nothing to move)"
        )
    return str(previous), str(new)


def request_move(bootstrap: str, config: Config, review: IdentityReview) -> list[str]:
    """Send the MOVE of an accepted review again (what reached the previous Patient after the first move, e.g. a
    record that waited in a retry topic): to the order stage, keyed by that Patient; the targets it went to."""
    from .identity import moving_targets
    from .patientmove import move_request

    previous, new = moved_keys(review)
    holder = str((review.closed or {}).get("holder") or "")  # the surviving record's local id after a merge
    patient = decode(review.value, NormalizedResource)
    targets = moving_targets(config.sites[review.site])
    producer = AcknowledgedProducer(bootstrap)
    for target in targets:
        move = move_request(patient, target, previous, new, int(time.time() * 1000), holder)
        producer.produce(config.topics.name("identified"), encode(move), previous.encode())
    producer.finish("move")
    return targets


def survivor_not_there(config: Config, review: IdentityReview) -> tuple[str | None, list[str]]:
    """For a merge under review: the surviving record's local id, and the targets whose Patient of the proposed
    key does not hold it (yet): not sent there, or under identity review itself. The move waits for it."""
    from .identity import merged_into, moving_targets
    from .patientmove import holds_local_patient

    record = decode(review.value, NormalizedResource)
    survivor = merged_into(orjson.loads(record.resource)) if record.resource else None
    if survivor is None or review.proposed_key is None:
        return survivor, []

    async def run() -> list[str]:
        missing = []
        for target in moving_targets(config.sites[review.site]):
            async with FhirClient(config.target(target)) as client:
                patient = await client.read("Patient", str(review.proposed_key))
            if not holds_local_patient(patient, review.site, survivor):
                missing.append(target)
        return missing

    return survivor, asyncio.run(run())


def written_before(config: Config, site: SiteConfig, patient_key: str) -> dict[str, list[str]]:
    """Per target: the site's resources that the central Patient patient_key holds (before an accepted change
    of identity, what the worker is to move; after it, what it has not moved yet)."""

    async def run() -> dict[str, list[str]]:
        result = {}
        for target in sorted({route.target for route in site.routes}):
            async with FhirClient(config.target(target)) as client:
                result[target] = await everything_of_site(client, patient_key, site.site)
        return result

    return asyncio.run(run())
