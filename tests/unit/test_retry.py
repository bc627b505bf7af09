"""Which tier a failed record goes to next, and the circuit breaker that holds writes during an outage."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.breaker import CircuitBreaker, reachable
from pipeline.deadletter import FailureInfo, retry_schedule
from pipeline.errors import RejectedByTargetError, TargetUnavailableError

pytestmark = pytest.mark.unit
DELAYS = [60, 600, 3600]


def _failed(tier: int, due_ms: int = 1) -> FailureInfo:
    return FailureInfo("sink", "target_unavailable", "503", 5, 0, 0, "fhir.ready.v1", 2, 40, due_ms=due_ms, tier=tier)


def test_first_failure_goes_to_the_first_tier() -> None:
    assert retry_schedule(None, DELAYS, TargetUnavailableError("503")) == (0, 60)


@pytest.mark.parametrize(("tier", "expected"), [(0, (1, 600)), (1, (2, 3600)), (2, None)])
def test_each_failure_after_a_tier_moves_one_on_and_the_last_ends_in_the_dead_letters(tier, expected) -> None:
    assert retry_schedule(_failed(tier), DELAYS, TargetUnavailableError("503")) == expected


def test_a_dead_letter_that_never_waited_in_a_tier_starts_at_the_first() -> None:
    # dead-lettered straight from the sink (due 0), then replayed and failing transiently
    assert retry_schedule(_failed(0, due_ms=0), DELAYS, TargetUnavailableError("503")) == (0, 60)


def test_a_replayed_dead_letter_starts_over() -> None:
    assert retry_schedule(_failed(-1), DELAYS, TargetUnavailableError("503")) == (0, 60)


def test_retry_after_lengthens_the_delay_never_shortens_it() -> None:
    assert retry_schedule(None, DELAYS, TargetUnavailableError("429", retry_after=300)) == (0, 300)
    assert retry_schedule(None, DELAYS, TargetUnavailableError("429", retry_after=5)) == (0, 60)
    assert retry_schedule(None, DELAYS, RejectedByTargetError("400", status=400)) == (0, 60)


@pytest.mark.parametrize(
    ("status", "up"),
    [(200, True), (401, True), (404, True), (0, False), (429, False), (500, False), (503, False), (408, False)],
)
def test_probe_statuses(status: int, up: bool) -> None:
    assert reachable(status) is up


def test_breaker_holds_until_the_target_answers_and_backs_off_meanwhile() -> None:
    answers = iter([0, 0, 503, 0, 200])
    sleeps: list[float] = []
    changes: list[bool] = []

    async def probe() -> int:
        return next(answers)

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    breaker = CircuitBreaker("central", probe, initial_seconds=1, max_seconds=4, on_change=changes.append, sleep=sleep)
    asyncio.run(breaker.wait_until_reachable())
    assert changes == [True, False] and breaker.outages == 1 and not breaker.is_open
    assert len(sleeps) == 4
    nominal = [1, 2, 4, 4]  # doubling, capped, each with ±20 % jitter
    assert all(0.8 * n <= s <= 1.2 * n for s, n in zip(sleeps, nominal, strict=True))


def test_breaker_does_not_wait_when_the_target_answers() -> None:
    async def probe() -> int:
        return 200

    async def sleep(seconds: float) -> None:
        raise AssertionError("must not sleep")

    breaker = CircuitBreaker("central", probe, sleep=sleep)
    assert asyncio.run(breaker.target_down()) is False
    asyncio.run(breaker.wait_until_reachable())
    assert breaker.outages == 0
