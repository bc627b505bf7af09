"""Which tier a failed record goes to next, and the circuit breaker that holds writes during an outage."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.breaker import GIVE_UP_CHECK_SECONDS, CircuitBreaker, HoldAbandoned, reachable
from pipeline.deadletter import FailureInfo, retry_schedule
from pipeline.errors import AwaitedWriteError, ReferenceNotReadyError, TargetUnavailableError

pytestmark = pytest.mark.unit
DELAYS = [60, 600, 3600]


def _failed(tier: int, due_ms: int = 1) -> FailureInfo:
    return FailureInfo("sink", "target_unavailable", "503", 5, 0, 0, "fhir.ready.v1", 2, 40, due_ms=due_ms, tier=tier)


def test_first_failure_goes_to_the_first_tier() -> None:
    assert retry_schedule(None, DELAYS) == (0, 60)


@pytest.mark.parametrize(("tier", "expected"), [(0, (1, 600)), (1, (2, 3600)), (2, None)])
def test_each_failure_after_a_tier_moves_one_on_and_the_last_ends_in_the_dead_letters(tier, expected) -> None:
    assert retry_schedule(_failed(tier), DELAYS) == expected


def test_a_dead_letter_that_never_waited_in_a_tier_starts_at_the_first() -> None:
    # dead-lettered straight from the sink (due 0), then replayed and failing transiently
    assert retry_schedule(_failed(0, due_ms=0), DELAYS) == (0, 60)


def test_a_replayed_dead_letter_starts_over() -> None:
    assert retry_schedule(_failed(-1), DELAYS) == (0, 60)


def test_a_failure_known_to_end_by_itself_goes_round_the_last_tier_until_its_time_is_up() -> None:
    """A delete waiting for a write another partition's sink owes (pipeline/errors.py AwaitedWriteError)."""
    assert retry_schedule(_failed(2), DELAYS, stay_until_ms=86_400_000, now_ms=80_000_000) == (2, 3600)
    assert retry_schedule(_failed(2), DELAYS, stay_until_ms=86_400_000, now_ms=86_400_000) is None
    assert retry_schedule(_failed(0), DELAYS, stay_until_ms=86_400_000, now_ms=0) == (1, 600)


def test_retry_after_is_waited_for_in_process_up_to_a_bound() -> None:
    from tenacity import RetryCallState

    from pipeline.sink import RetryPolicy, retry_wait

    policy = RetryPolicy(initial_seconds=0.5, max_seconds=8, max_retry_after_seconds=120)

    def state(error: BaseException, attempt: int = 1) -> RetryCallState:
        call = RetryCallState(None, None, (), {})
        call.attempt_number = attempt
        call.set_exception((type(error), error, None))
        return call

    wait = retry_wait(policy)
    assert wait(state(TargetUnavailableError("429", retry_after=30))) == 30
    assert wait(state(TargetUnavailableError("429", retry_after=9999))) == 120  # longer: the tiers take over
    assert 0 < wait(state(TargetUnavailableError("503"))) <= 8


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


def test_a_hold_is_given_up_within_a_check_of_the_holder_saying_so() -> None:
    """A rebalance or a stop must not wait out the breaker's backoff (up to 30 s) nor the outage."""
    slept: list[float] = []
    changes: list[bool] = []

    async def probe() -> int:
        return 0  # the target stays unreachable

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    def give_up() -> str | None:
        return "its partitions are being reassigned" if sum(slept) >= 7 else None

    breaker = CircuitBreaker("central", probe, initial_seconds=4, max_seconds=30, on_change=changes.append, sleep=sleep)
    with pytest.raises(HoldAbandoned, match="its partitions are being reassigned"):
        asyncio.run(breaker.wait_until_reachable(give_up=give_up))
    assert all(0 < s <= GIVE_UP_CHECK_SECONDS for s in slept)
    assert 7 <= sum(slept) < 7 + GIVE_UP_CHECK_SECONDS + 1e-9  # the first check after it said so
    assert breaker.is_open and changes == [True]  # the outage is not over: nothing says it is


def test_a_hold_is_given_up_while_a_probe_hangs() -> None:
    """A target that accepts connections and never answers: the probe lasts the client's timeout (30 s)."""
    asked: list[int] = []

    async def probe() -> int:
        await asyncio.sleep(3600)
        return 0

    async def sleep(seconds: float) -> None:
        raise AssertionError("the hold must end during the probe")

    def give_up() -> str | None:
        asked.append(1)
        return "the worker is stopping" if len(asked) > 2 else None

    breaker = CircuitBreaker("central", probe, sleep=sleep)
    with pytest.raises(HoldAbandoned, match="the worker is stopping"):
        asyncio.run(breaker.wait_until_reachable(give_up=give_up))
    assert len(asked) == 3  # before the probe, then after each half second of it


def test_a_hold_asked_whether_to_give_up_still_ends_when_the_target_answers() -> None:
    answers = iter([0, 0, 200])
    slept: list[float] = []
    asked: list[int] = []

    async def probe() -> int:
        return next(answers)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    def give_up() -> str | None:
        asked.append(1)
        return None

    breaker = CircuitBreaker("central", probe, initial_seconds=1, max_seconds=4, sleep=sleep)
    asyncio.run(breaker.wait_until_reachable(give_up=give_up))
    assert not breaker.is_open and breaker.outages == 1
    assert 0.8 * 3 <= sum(slept) <= 1.2 * 3  # the same backoff (1 s, then 2 s), in slices
    assert len(asked) >= len(slept) + 3  # after every slice and before every probe


def test_breaker_does_not_wait_when_the_target_answers() -> None:
    async def probe() -> int:
        return 200

    async def sleep(seconds: float) -> None:
        raise AssertionError("must not sleep")

    breaker = CircuitBreaker("central", probe, sleep=sleep)
    assert asyncio.run(breaker.target_down()) is False
    asyncio.run(breaker.wait_until_reachable())
    assert breaker.outages == 0


def test_a_tier_record_waits_until_due_but_never_longer_than_the_tier_delay() -> None:
    from pipeline.retrytiers import wait_seconds

    assert wait_seconds(due_ms=70_000, delay_seconds=60, now_ms=40_000) == 30
    assert wait_seconds(due_ms=40_000, delay_seconds=60, now_ms=70_000) == 0  # overdue: at once
    assert wait_seconds(due_ms=3_640_000, delay_seconds=5, now_ms=40_000) == 5  # the delay was shortened since


@pytest.mark.parametrize("interrupted_after", [None, 2])
def test_in_process_retries_end_when_the_holder_gives_up(
    monkeypatch: pytest.MonkeyPatch, interrupted_after: int | None
) -> None:
    """A target that never answers costs a timeout per attempt (5 x 30 s by default): a rebalance or a stop must
    not wait for all of them. Without a reason to give up, every attempt is made."""
    from pipeline import sink
    from tests.casebuilder import routed_record

    calls: list[int] = []

    async def unavailable(client: object, record: object, versions: object) -> None:
        calls.append(1)
        raise TargetUnavailableError("PUT Observation/x: TimeoutError")

    def give_up() -> str | None:
        return "its partitions are being reassigned" if interrupted_after and len(calls) >= interrupted_after else None

    monkeypatch.setattr(sink, "write_record", unavailable)
    record = routed_record({"resourceType": "Observation", "id": "obs-1"}, patient_key="p")
    policy = sink.RetryPolicy(attempts=4, initial_seconds=0.001, max_seconds=0.002, give_up=give_up)
    with pytest.raises(TargetUnavailableError) as raised:
        asyncio.run(sink.write_with_retries(object(), record, policy))  # type: ignore[arg-type]
    made = interrupted_after or 4
    assert len(calls) == made and raised.value.attempts_made == made  # type: ignore[attr-defined]


def _tries_until_it_fails(monkeypatch: pytest.MonkeyPatch, error: Exception, **policy: Any) -> tuple[int, Exception]:
    """Writes of an Observation that always fail with `error`, under a RetryPolicy of 4 attempts and `policy`:
    how many were made, and what write_with_retries raised."""
    from pipeline import sink
    from tests.casebuilder import routed_record

    calls: list[int] = []

    async def failing(client: object, record: object, versions: object) -> None:
        calls.append(1)
        raise error

    monkeypatch.setattr(sink, "write_record", failing)
    record = routed_record({"resourceType": "Observation", "id": "obs-1"}, patient_key="p")
    retry = sink.RetryPolicy(attempts=4, initial_seconds=0.001, max_seconds=0.002, **policy)
    with pytest.raises(type(error)) as raised:
        asyncio.run(sink.write_with_retries(object(), record, retry))  # type: ignore[arg-type]
    return len(calls), raised.value


@pytest.mark.parametrize(
    ("error", "tries"),
    [
        (TargetUnavailableError("answered 503"), 4),
        (ReferenceNotReadyError("HAPI-1096: Patient/x is deleted"), 1),
        (AwaitedWriteError("the previous Patient's sink owes a write"), 1),
    ],
)
def test_narrowed_retries_back_off_only_for_an_unavailable_target(
    monkeypatch: pytest.MonkeyPatch, error: Exception, tries: int
) -> None:
    """A record back from a tier retries in process only what a moment may fix (the target unavailable); a write
    that waits for another one goes on to the next tier at once instead of holding the sink for the backoff."""
    calls, _ = _tries_until_it_fails(monkeypatch, error, retry_on=(TargetUnavailableError,))
    assert calls == tries


@pytest.mark.parametrize(
    ("error", "tries"),
    [
        (TargetUnavailableError("answered 503"), 4),
        (ReferenceNotReadyError("HAPI-1096: Patient/x is deleted"), 2),
        (AwaitedWriteError("the previous Patient's sink owes a write"), 2),
    ],
)
def test_a_write_that_waits_for_another_one_is_tried_twice_an_unavailable_target_every_time(
    monkeypatch: pytest.MonkeyPatch, error: Exception, tries: int
) -> None:
    """A first failure: what a write waits for is often another patient's write of the same batch, so it is tried
    once more; not for every attempt, which would hold the sink's batch, every patient's, for the whole backoff."""
    calls, raised = _tries_until_it_fails(monkeypatch, error, waiting_attempts=2)
    assert calls == tries and raised.attempts_made == tries  # type: ignore[attr-defined]


def test_a_write_that_waits_and_then_goes_through_on_its_second_try_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import sink
    from pipeline.fhirclient import WriteOutcome
    from tests.casebuilder import routed_record

    calls: list[int] = []

    async def second_time(client: object, record: object, versions: object) -> WriteOutcome:
        calls.append(1)
        if len(calls) == 1:
            raise AwaitedWriteError("the new Patient is not written yet")
        return WriteOutcome(200, "3")

    monkeypatch.setattr(sink, "write_record", second_time)
    record = routed_record({"resourceType": "Observation", "id": "obs-1"}, patient_key="p")
    policy = sink.RetryPolicy(attempts=4, initial_seconds=0.001, max_seconds=0.002, waiting_attempts=2)
    outcome, used = asyncio.run(sink.write_with_retries(object(), record, policy))  # type: ignore[arg-type]
    assert outcome.version_id == "3" and used == 2


def test_a_write_that_goes_through_closes_a_breaker_left_open_by_a_hold_given_up() -> None:
    """Write-back gives a hold up after its limit with the breaker open (the alert stays on); the next write
    that gets through closes it, once."""
    changes: list[bool] = []

    async def probe() -> int:
        return 0

    async def sleep(seconds: float) -> None:
        return None

    breaker = CircuitBreaker("site-a", probe, on_change=changes.append, sleep=sleep)
    breaker.note_reachable()
    assert changes == [] and not breaker.is_open  # closed already: nothing to report
    with pytest.raises(HoldAbandoned):
        asyncio.run(breaker.wait_until_reachable(give_up=lambda: "held 600 s"))
    assert breaker.is_open is False and changes == []  # given up before its first probe: never opened
    with pytest.raises(HoldAbandoned):
        asyncio.run(breaker.wait_until_reachable(give_up=lambda: "held 600 s" if changes else None))
    assert breaker.is_open and changes == [True]
    breaker.note_reachable()
    breaker.note_reachable()
    assert not breaker.is_open and changes == [True, False]
