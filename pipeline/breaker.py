"""A circuit breaker per target: while a target cannot be reached, the sink waits instead of sending
record after record through the retry tiers to the dead letters.

After the in-process retries of a write fail with a transient error, the sink asks the breaker. The
breaker probes the target (GET metadata). If the target answers, the problem is this record's, and
it goes to a retry tier. If it does not, the breaker opens: the sink holds the record (its offset is
not committed, nothing is lost) and probes with exponential backoff until the target answers, then
closes, and the sink tries the same record again. While it is open, a gauge says so (alert TargetDown).

A hold can last as long as the outage, so whoever holds can say when to give it up (give_up): the breaker
checks it at least every GIVE_UP_CHECK_SECONDS and raises HoldAbandoned with its reason. The sink gives a
hold up when the worker stops or its partitions are being reassigned: a hold there would keep the whole
consumer group waiting for the target.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

__all__ = ["GIVE_UP_CHECK_SECONDS", "CircuitBreaker", "HoldAbandoned", "reachable"]

log = logging.getLogger("cdrsync.breaker")
GIVE_UP_CHECK_SECONDS = 0.5


class HoldAbandoned(Exception):
    """A hold given up before the target answered; the message is the holder's reason."""


def reachable(status: int) -> bool:
    """A probe status that means the target is there and serving (even if it refuses us: that is not an outage)."""
    return 0 < status < 500 and status not in (408, 429)


class CircuitBreaker:
    """Probe, wait with backoff while the target is unreachable, report the outage."""

    def __init__(
        self,
        target: str,
        probe: Callable[[], Awaitable[int]],
        *,
        initial_seconds: float = 1.0,
        max_seconds: float = 30.0,
        on_change: Callable[[bool], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.target = target
        self._probe = probe
        self.initial_seconds, self.max_seconds = initial_seconds, max_seconds
        self._on_change = on_change or (lambda is_open: None)
        self._sleep = sleep
        self.is_open = False
        self.outages = 0

    def note_reachable(self, how: str = "a write went through") -> None:
        """The target answered: close the breaker if it was open (a hold given up leaves it open)."""
        if self.is_open:
            self.is_open = False
            self._on_change(False)
            log.warning("target %s reachable again (%s); resuming", self.target, how)

    async def target_down(self) -> bool:
        """Probe once: True when the target cannot be reached."""
        return not reachable(await self._probe())

    async def wait_until_reachable(self, give_up: Callable[[], str | None] | None = None) -> float:
        """Hold until a probe succeeds; the seconds spent waiting (0 when the target answers at once).

        give_up: asked before every probe and at least every GIVE_UP_CHECK_SECONDS while waiting; a reason
        it returns ends the hold with HoldAbandoned(reason), the breaker still open.
        """
        started = time.monotonic()
        delay = self.initial_seconds
        while True:
            _check(give_up)
            status = await self._probe_unless(give_up)
            if reachable(status):
                self.note_reachable(f"after {time.monotonic() - started:.0f}s")
                return time.monotonic() - started
            if not self.is_open:
                self.is_open = True
                self.outages += 1
                self._on_change(True)
                log.error("target %s unreachable (probe %d); holding writes until it answers", self.target, status)
            await self._pause(delay * random.uniform(0.8, 1.2), give_up)
            delay = min(delay * 2, self.max_seconds)

    async def _probe_unless(self, give_up: Callable[[], str | None] | None) -> int:
        """A probe, given up with the hold: against a target that accepts connections and never answers, a probe
        lasts the client's whole timeout (30 s by default)."""
        if give_up is None:
            return await self._probe()
        probe = asyncio.ensure_future(self._probe())
        try:
            while True:
                done, _ = await asyncio.wait({probe}, timeout=GIVE_UP_CHECK_SECONDS)
                if done:
                    return probe.result()
                _check(give_up)
        finally:
            probe.cancel()  # a no-op once it is done

    async def _pause(self, seconds: float, give_up: Callable[[], str | None] | None) -> None:
        if give_up is None:
            await self._sleep(seconds)
            return
        left = seconds
        while left > 0:
            step = min(left, GIVE_UP_CHECK_SECONDS)
            await self._sleep(step)
            left -= step
            _check(give_up)


def _check(give_up: Callable[[], str | None] | None) -> None:
    reason = give_up() if give_up is not None else None
    if reason:
        raise HoldAbandoned(reason)
