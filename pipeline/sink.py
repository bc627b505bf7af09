"""Stage 4: write a ready resource to its target, with short in-process retries for transient failures.

Writes are version-aware (DESIGN.md decision 8): the sink remembers, per target reference, the version
the target gave its last write (table written_version_by_reference) and updates only over that version
(If-Match). If someone edited the resource at the target since, or another writer did, the change is
not applied: VersionConflictError carries the target's current version for the conflicts topic.
Every body carries the SHA-256 of its content in an extension (not a meta.tag: HAPI keeps the tags of
earlier versions), so a refusal caused by our own earlier write (applied at the target, then the
worker died before remembering its version) is recognised as ours and not reported as a conflict;
the content is compared too (is_our_write), since an edit at the target keeps the extension.
The version is kept in the sink's per-resource table (pipeline/blocking.py TargetVersions).
Deletes are not version-checked: HAPI does not honour If-Match on DELETE.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .errors import CdrsyncError, RetryableError, VersionConflictError
from .fhirclient import FhirClient, WriteOutcome
from .records import RoutedResource

__all__ = [
    "CONTENT_HASH_EXTENSION",
    "RetryPolicy",
    "body_to_write",
    "content_hash_of",
    "is_our_write",
    "retry_wait",
    "write_record",
    "write_with_retries",
]

CONTENT_HASH_EXTENSION = "urn:cdrsync:content-hash"
Versions = MutableMapping[str, dict[str, Any]]


class RetryPolicy:
    """In-process retries before a record moves to a retry topic."""

    def __init__(
        self,
        attempts: int = 5,
        initial_seconds: float = 0.5,
        max_seconds: float = 8.0,
        max_retry_after_seconds: float = 120.0,
    ) -> None:
        self.attempts = attempts
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds
        self.max_retry_after_seconds = max_retry_after_seconds  # longer: the retry tiers take over


def body_to_write(record: RoutedResource) -> bytes:
    """The resource as sent: the SHA-256 of its content added as an extension."""
    assert record.resource is not None
    body = orjson.loads(record.resource)
    extensions = [e for e in body.get("extension", []) if e.get("url") != CONTENT_HASH_EXTENSION]
    extensions.append({"url": CONTENT_HASH_EXTENSION, "valueString": record.content_hash})
    return orjson.dumps({**body, "extension": extensions})


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
    """PUT the resource at its deterministic id over the version we last wrote, or DELETE it."""
    versions = {} if versions is None else versions
    ref = record.target_ref
    if record.is_delete:
        if record.delete_with:  # a reference cycle: one transaction deletes all of it
            outcome = await client.delete_all([ref, *record.delete_with])
        else:
            outcome = await client.delete(record.resource_type, record.target_id)
        for gone in [ref, *record.delete_with]:
            versions.pop(gone, None)
        return outcome
    known = versions.get(ref, {}).get("version")
    body = body_to_write(record)
    try:
        outcome = await client.put(record.resource_type, record.target_id, body, if_match=known)
    except VersionConflictError as conflict:
        current = await client.read(record.resource_type, record.target_id)
        if not is_our_write(orjson.loads(body), current):
            raise VersionConflictError(str(conflict), current=current) from None
        assert current is not None
        version = str((current.get("meta") or {}).get("versionId"))  # our own write, replayed after a crash
        outcome = WriteOutcome(200, version)
    if outcome.version_id is not None:
        versions[ref] = {"version": outcome.version_id}
    return outcome


def retry_wait(policy: RetryPolicy) -> Callable[[RetryCallState], float]:
    """Exponential backoff with jitter, or longer when the target said when to come back (Retry-After)."""
    backoff = wait_exponential_jitter(multiplier=policy.initial_seconds, max=policy.max_seconds)

    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None else None
        retry_after = getattr(error, "retry_after", None) or 0.0
        return max(float(backoff(state)), min(float(retry_after), policy.max_retry_after_seconds))

    return wait


async def write_with_retries(
    client: FhirClient, record: RoutedResource, policy: RetryPolicy, versions: Versions | None = None
) -> tuple[WriteOutcome, int]:
    """Write with exponential backoff and jitter on retryable errors; (outcome, attempts used).

    An error raised carries the number of attempts made in `attempts_made` (for the dead-letter headers).
    """
    attempts = 0
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=retry_wait(policy),
            retry=retry_if_exception_type(RetryableError),
            reraise=True,
        ):
            with attempt:
                attempts = attempt.retry_state.attempt_number
                return await write_record(client, record, versions), attempts
    except CdrsyncError as error:
        error.attempts_made = attempts  # type: ignore[attr-defined]
        raise
    raise AssertionError("unreachable: tenacity either returns or reraises")
