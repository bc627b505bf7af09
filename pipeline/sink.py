"""Stage 4: write a ready resource to its target, with short in-process retries for transient failures."""

from __future__ import annotations

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from .errors import RetryableError
from .fhirclient import FhirClient, WriteOutcome
from .records import RoutedResource

__all__ = ["RetryPolicy", "write_record", "write_with_retries"]


class RetryPolicy:
    """In-process retries before a record moves to a retry topic."""

    def __init__(self, attempts: int = 5, initial_seconds: float = 0.5, max_seconds: float = 8.0) -> None:
        self.attempts = attempts
        self.initial_seconds = initial_seconds
        self.max_seconds = max_seconds


async def write_record(client: FhirClient, record: RoutedResource) -> WriteOutcome:
    """PUT the resource at its deterministic id, or DELETE it."""
    if record.is_delete and record.delete_with:  # a reference cycle: one transaction deletes all of it
        return await client.delete_all([record.target_ref, *record.delete_with])
    if record.is_delete:
        return await client.delete(record.resource_type, record.target_id)
    assert record.resource is not None
    return await client.put(record.resource_type, record.target_id, record.resource.encode())


async def write_with_retries(
    client: FhirClient, record: RoutedResource, policy: RetryPolicy
) -> tuple[WriteOutcome, int]:
    """Write with exponential backoff and jitter on retryable errors; (outcome, attempts used)."""
    attempts = 0
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(initial=policy.initial_seconds, max=policy.max_seconds),
        retry=retry_if_exception_type(RetryableError),
        reraise=True,
    ):
        with attempt:
            attempts = attempt.retry_state.attempt_number
            return await write_record(client, record), attempts
    raise AssertionError("unreachable: tenacity either returns or reraises")
