"""Stage 4: write a ready resource to its target, with short in-process retries for transient failures.

Writes are version-aware (DESIGN.md decision 8): the sink remembers, per target reference, the version
the target gave its last write (kept in the sink's per-resource table, pipeline/blocking.py
TargetVersions) and updates only over that version (If-Match). If someone edited the resource at the
target since, the change is not applied: VersionConflictError carries the target's current version for
the conflicts topic.

Every body carries two extensions: the SHA-256 of its content (not a meta.tag: HAPI keeps the tags of
earlier versions; the audit trail quotes it), and a mark of the source row and position that wrote it
with the hash of the body itself. When the target refuses a write, the sink reads the current version:
* exactly what it is sending (is_our_write): its own write, applied before a crash, so not a conflict;
* unchanged since cdrsync wrote it (untouched_write; an edit keeps the extensions but breaks the hash):
  a write of ours that the sink's table lost in a crash. A later version of the same row is left in
  place (status 304); an earlier one is written over, still version-checked;
* anything else: a conflict.
When the sink's table has no version of the resource (a first write, or a crash lost the table's
record of writes that reached the target), the target is read first and the same rules apply; a
later version left in place is not adopted as the base, so the next older copy read again is caught
the same way. Deletes are not version-checked (HAPI does not honour If-Match on DELETE), but a delete
read again after its row came back does not undo the later version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_any,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from .errors import (
    AwaitedWriteError,
    CdrsyncError,
    RejectedByTargetError,
    RetryableError,
    TargetUnavailableError,
    VersionConflictError,
)
from .fhirclient import FhirClient, WriteOutcome
from .records import RoutedResource, canonical_hash

__all__ = [
    "CONTENT_HASH_EXTENSION",
    "WRITTEN_BY_EXTENSION",
    "RetryPolicy",
    "Versions",
    "Writer",
    "body_to_write",
    "content_hash_of",
    "is_our_write",
    "remarked",
    "retry_wait",
    "untouched_write",
    "write_record",
    "write_with_retries",
]

log = logging.getLogger("cdrsync.sink")

CONTENT_HASH_EXTENSION = "urn:cdrsync:content-hash"
WRITTEN_BY_EXTENSION = "urn:cdrsync:written-by"  # "<site>|<source id>|<source LSN>|<SHA-256 of the body>"
_OWN_EXTENSIONS = (CONTENT_HASH_EXTENSION, WRITTEN_BY_EXTENSION)
Versions = MutableMapping[str, dict[str, Any]]


class RetryPolicy:
    """In-process retries before a record moves to a retry topic."""

    def __init__(
        self,
        attempts: int = 5,
        initial_seconds: float = 0.5,
        max_seconds: float = 8.0,
        max_retry_after_seconds: float = 120.0,
        give_up: Callable[[], str | None] | None = None,
        retry_on: tuple[type[Exception], ...] = (RetryableError,),
        waiting_attempts: int | None = None,
    ) -> None:
        self.attempts = attempts
        self.retry_on = retry_on  # the errors retried in process (all retryable ones unless narrowed)
        # Tries, at most, for a retryable error other than an unavailable target (a write that waits for another
        # one): None for `attempts`.
        self.waiting_attempts = waiting_attempts
        # Asked after each failed attempt: a reason ends the retries there (the last error is raised). The
        # sink's says the worker is stopping or handing its partitions over, which waits for this record.
        self.give_up = give_up
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.max_retry_after_seconds = max_retry_after_seconds  # longer: the retry tiers take over


def _own_extensions_removed(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without meta (the server rewrites it) and without cdrsync's own extensions."""
    body = {k: v for k, v in resource.items() if k != "meta"}
    extensions = [e for e in body.pop("extension", []) if e.get("url") not in _OWN_EXTENSIONS]
    return {**body, "extension": extensions} if extensions else body


def body_to_write(record: RoutedResource) -> bytes:
    """The resource as sent: the SHA-256 of its content added as an extension, and a mark saying which
    source row and position wrote it, with the hash of the body itself (see untouched_write)."""
    assert record.resource is not None
    body = orjson.loads(record.resource)
    extensions = [e for e in body.get("extension", []) if e.get("url") not in _OWN_EXTENSIONS]
    mark = _written_by(f"{record.site}|{record.source_id}", record.source_lsn, body)
    extensions.append({"url": CONTENT_HASH_EXTENSION, "valueString": record.content_hash})
    extensions.append({"url": WRITTEN_BY_EXTENSION, "valueString": mark})
    return orjson.dumps({**body, "extension": extensions})


def _written_by(row: str, lsn: int | None, body: dict[str, Any]) -> str:
    """The written-by mark: "<site>|<source id>|<source LSN>|<SHA-256 of the body without meta and without
    cdrsync's own extensions>" (untouched_write reads it)."""
    return f"{row}|{'' if lsn is None else lsn}|{canonical_hash(_own_extensions_removed(body))}"


def untouched_write(resource: dict[str, Any] | None) -> tuple[str, int | None] | None:
    """(source row, source LSN) when the resource is exactly as cdrsync wrote it; None when it was
    changed since (its body no longer matches the hash cdrsync wrote into it) or cdrsync never wrote it.
    An edit at the target keeps the extensions, but not the match."""
    mark = _written_by_mark(resource)
    if mark is None or resource is None or canonical_hash(_own_extensions_removed(resource)) != mark[2]:
        return None
    return mark[0], mark[1]


def _written_by_mark(resource: dict[str, Any] | None) -> tuple[str, int | None, str] | None:
    """(source row, source LSN, body hash) of the written-by mark a resource carries, edited since or not."""
    for extension in (resource or {}).get("extension", []):
        if extension.get("url") == WRITTEN_BY_EXTENSION:
            site, source_id, lsn, digest = [*str(extension.get("valueString")).split("|"), "", "", "", ""][:4]
            return f"{site}|{source_id}", int(lsn) if lsn.isdigit() else None, digest
    return None


def remarked(written: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """`changed` (a copy of `written` with some of its content changed by cdrsync itself, e.g. a Patient
    reference moved) with the written-by mark's hash made to match it, when `written` is exactly as cdrsync
    wrote it; else `changed` as it is, so that an edit made at the target stays recognisable as one."""
    mark = untouched_write(written)
    if mark is None:
        return changed
    extensions = [
        {**e, "valueString": _written_by(*mark, changed)} if e.get("url") == WRITTEN_BY_EXTENSION else e
        for e in changed.get("extension", [])
    ]
    return {**changed, "extension": extensions}


def content_hash_of(resource: dict[str, Any] | None) -> str | None:
    """The content hash cdrsync wrote into a resource, None if it carries none."""
    for extension in (resource or {}).get("extension", []):
        if extension.get("url") == CONTENT_HASH_EXTENSION:
            return str(extension.get("valueString"))
    return None


def is_our_write(sent: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """True when the target's current version is exactly what we are about to send: our own earlier write
    (applied, then the worker died before remembering its version, or the answer was lost).

    The content-hash extension alone is no proof: a clinician who edits the resource at the target keeps
    it. So the content must be the same too (meta aside). A target that reformats what it stores makes
    this False: a conflict for review, never a silent overwrite.
    """
    if current is None or content_hash_of(current) != content_hash_of(sent):
        return False
    return {k: v for k, v in current.items() if k != "meta"} == {k: v for k, v in sent.items() if k != "meta"}


async def write_record(client: FhirClient, record: RoutedResource, versions: Versions | None = None) -> WriteOutcome:
    """PUT the resource at its deterministic id over the version we last wrote, or DELETE it.

    Without a version of ours for it (a first write, or the sink's table lost the write in a crash) the
    target is read first: a write is never sent blind over something cdrsync does not know it wrote.
    """
    versions = {} if versions is None else versions
    ref = record.target_ref
    if record.is_delete:
        return await _delete(client, record, versions)
    known = versions.get(ref, {}).get("version")
    body = body_to_write(record)
    if known is None:
        outcome = await _first_write(client, record, body)
    else:
        try:
            outcome = await client.put(record.resource_type, record.target_id, body, if_match=known)
        except VersionConflictError as conflict:
            current, gone = await client.read_or_gone(record.resource_type, record.target_id)
            if current is None and gone and await _deleted_since(client, record):
                return WriteOutcome(304, None)  # deleted after a later change of its row (an identity move's race)
            outcome = await _over_current(client, record, body, current, str(conflict))
    if outcome.version_id is not None and outcome.status != 304:
        versions[ref] = {"version": outcome.version_id}
    return outcome


async def _first_write(client: FhirClient, record: RoutedResource, body: bytes) -> WriteOutcome:
    """Write a resource we hold no version of, never over something already there: created in one request
    where the target allows it (FhirClient.create_if_absent), else the target is read first."""
    created = await client.create_if_absent(record.resource_type, record.target_id, body)
    if created is not None:
        return created
    current, gone = await client.read_or_gone(record.resource_type, record.target_id)
    if current is None:  # nothing there (or deleted): a first write, unless it was deleted after this change
        if gone and await _deleted_since(client, record):
            return WriteOutcome(304, None)
        return await client.put(record.resource_type, record.target_id, body)
    return await _over_current(client, record, body, current, "the target holds a version we do not know")


async def _deleted_since(client: FhirClient, record: RoutedResource) -> bool:
    """True when the target deleted the resource after holding this change of its source row, or a later one:
    the record is an older change arriving late (a re-send of Debezium's meeting an identity review's move, whose
    partitions do not share what they saw, or the previous Patient's sink lagging behind the new one's) and must
    not bring back what was deleted. A deletion leaves no mark, so the last version before it tells: cdrsync's
    mark of the same row at this position or a later one (edited at the target since, or not). Read only when a
    write finds the resource deleted (410 Gone); a target that answers 404 for a deleted resource, or keeps no
    instance history, cannot tell, and the write goes ahead as before."""
    if record.source_lsn is None:
        return False
    try:
        last = await client.last_stored(record.resource_type, record.target_id)
    except RejectedByTargetError as error:
        log.warning("%s: the target's history cannot be read (%s)", record.target_ref, error.status)
        return False
    mark = _written_by_mark(last)
    row = f"{record.site}|{record.source_id}"
    return mark is not None and mark[0] == row and mark[1] is not None and mark[1] >= record.source_lsn


async def _over_current(
    client: FhirClient, record: RoutedResource, body: bytes, current: dict[str, Any] | None, reason: str
) -> WriteOutcome:
    """Write over what the target holds now (read after a refusal, or because our table had no version)."""
    version = str(((current or {}).get("meta") or {}).get("versionId"))
    mark = untouched_write(current)
    if is_our_write(orjson.loads(body), current):  # this very write, applied before a crash
        return WriteOutcome(200, version)
    if mark is None:  # changed at the target since cdrsync wrote it, or never written by cdrsync: for review
        raise VersionConflictError(reason, current=current)
    if _newer(mark, record):
        # A later version of this row is already there (our table lost it). Its version is not adopted as
        # the base: the next older copy read again must find out the same way, not be written over it.
        return WriteOutcome(304, version)
    # an earlier write of ours that our table lost (a crash): write over it, still version-checked
    return await client.put(record.resource_type, record.target_id, body, if_match=version)


async def _delete(client: FhirClient, record: RoutedResource, versions: Versions) -> WriteOutcome:
    """DELETE the resource (a reference cycle: all of it in one transaction), unless a later version of the
    same source row is already at the target: a delete read again after a crash must not undo it."""
    ref = record.target_ref
    if record.source_lsn is not None:
        current, gone = await client.read_or_gone(record.resource_type, record.target_id)
        if record.awaits_lsn is not None and not gone:
            _await(ref, current, f"{record.site}|{record.source_id}", record.awaits_lsn, record.captured_ms)
        for awaited in record.awaits_with:  # the others deleted with it (a reference cycle)
            member, member_gone = await client.read_or_gone(*awaited["ref"].split("/", 1))
            if not member_gone:
                _await(awaited["ref"], member, awaited["row"], awaited["lsn"], record.captured_ms)
        mark = untouched_write(current)
        if mark is not None and _newer(mark, record):
            return WriteOutcome(304, None)
    if record.delete_with:
        outcome = await client.delete_all([ref, *record.delete_with])
    else:
        outcome = await client.delete(record.resource_type, record.target_id)
    for deleted in [ref, *record.delete_with]:
        versions.pop(deleted, None)
    return outcome


#: How long after the hospital's delete only the very change it awaits will do (`_holds`).
AWAIT_EXACT_SECONDS = 30 * 60


def _await(ref: str, current: dict[str, Any] | None, row: str, awaits_lsn: int, deleted_ms: int) -> None:
    """Raise AwaitedWriteError unless the target holds the change of `row` at `awaits_lsn` that the delete of
    ref awaits (`_holds`): released before an identity move at the previous Patient, whose partition's sink has
    not written it yet, deleting now would delete nothing, and that write would then bring it back."""
    if not _holds(current, row, awaits_lsn, deleted_ms):
        raise AwaitedWriteError(
            f"{ref}: its change at source LSN {awaits_lsn}, released at the Patient before an identity "
            "move, is not at the target yet (if that write failed there and is discarded, the resource stays "
            "absent, as the hospital wants: this delete can be discarded too)"
        )


def _holds(current: dict[str, Any] | None, row: str, awaits_lsn: int, deleted_ms: int) -> bool:
    """Whether the target holds the change of the source row (site|source id) at `awaits_lsn` that a delete
    awaits, or a later one of the same row: as cdrsync wrote it or edited since (its mark says which change it
    came from). A resource without cdrsync's mark of that row was not written from it: held, for the delete to go
    ahead.

    An earlier change of the row will do too once the delete (captured at `deleted_ms`) is `AWAIT_EXACT_SECONDS`
    old: the awaited one may never come (the previous Patient's sink dead-lettered it, or it waited there in a
    retry tier and, sent on after the move, was older than this delete). Before that, deleting would let a late
    write of it, over the version it knew, become a conflict for review. Nothing at all at the target is never
    enough: the delete would delete nothing, and the late write would bring the resource back."""
    if current is None:
        return False
    mark = _written_by_mark(current)
    if mark is None or mark[0] != row or mark[1] is None:
        return True
    if mark[1] >= awaits_lsn:
        return True
    return time.time() * 1000 - deleted_ms >= AWAIT_EXACT_SECONDS * 1000


def _newer(mark: tuple[str, int | None], record: RoutedResource) -> bool:
    """True when the write marked at the target came from the same source row, at a later position."""
    row, lsn = mark
    same_row = row == f"{record.site}|{record.source_id}"
    return same_row and lsn is not None and record.source_lsn is not None and lsn > record.source_lsn


def retry_wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    """Exponential backoff with jitter, or longer when the target said when to come back (Retry-After)."""
    backoff = wait_exponential_jitter(multiplier=policy.initial_seconds, max=policy.max_seconds)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None) or 0.0
        return max(float(backoff(state)), min(float(retry_after), policy.max_retry_after_seconds))

    return wait


class _StopWhenGivenUp(stop_base):
    def __init__(self, give_up: Callable[[], str | None]) -> None:
        self.give_up = give_up

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.give_up() is not None


class _StopWaitingAfter(stop_base):
    """Stop after `attempts` tries when the last failure was not an unavailable target."""

    def __init__(self, attempts: int) -> None:
        self.attempts = attempts

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        return not isinstance(error, TargetUnavailableError) and retry_state.attempt_number >= self.attempts


Writer = Callable[[FhirClient, RoutedResource, Versions | None], Awaitable[WriteOutcome]]


async def write_with_retries(
    client: FhirClient,
    record: RoutedResource,
    policy: RetryPolicy,
    versions: Versions | None = None,
    write: Writer | None = None,
) -> tuple[WriteOutcome, int]:
    """Write with exponential backoff and jitter on retryable errors; (outcome, attempts used). `write` does
    the writing (write_record unless given: a MOVE record's is pipeline/patientmove.py move_site_records).

    An error raised carries the number of attempts made in `attempts_made` (for the dead-letter headers).
    """
    attempts = 0
    try:
        stop: stop_base = stop_after_attempt(policy.attempts)
        if policy.give_up is not None:
            stop = stop_any(stop, _StopWhenGivenUp(policy.give_up))
        if policy.waiting_attempts is not None:
            stop = stop_any(stop, _StopWaitingAfter(policy.waiting_attempts))
        async for attempt in AsyncRetrying(
            stop=stop,
            wait=retry_wait(policy),
            retry=retry_if_exception_type(policy.retry_on),
            reraise=True,
        ):
            with attempt:
                attempts = attempt.retry_state.attempt_number
                return await (write or write_record)(client, record, versions), attempts
    except CdrsyncError as error:
        error.attempts_made = attempts  # type: ignore[attr-defined]
        raise
    raise AssertionError("unreachable: tenacity either returns or reraises")
