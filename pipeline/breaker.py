"""A circuit breaker per target: while a target cannot be reached, the sink waits instead of sending
record after record through the retry tiers to the dead letters.

After the in-process retries of a write fail with a transient error, the sink asks the breaker. The
breaker probes the target (GET metadata). If the target answers, the problem is this record's, and
it goes to a retry tier. If it does not, the breaker opens: the sink holds the record (its offset is
not committed, nothing is lost) and probes with exponential backoff until the target answers, then
closes, and the sink tries the same record again. While it is open, a gauge says so (alert TargetDown).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

__all__ = ["CircuitBreaker", "reachable"]

log = logging.getLogger("cdrsync.breaker")


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

    async def target_down(self) -> bool:
        """Probe once: True when the target cannot be reached."""
        return not reachable(await self._probe())

    async def wait_until_reachable(self) -> float:
        """Hold until a probe succeeds; the seconds spent waiting (0 when the target answers at once)."""
        started = time.monotonic()
        delay = self.initial_seconds
        while True:
            status = await self._probe()
            if reachable(status):
                if self.is_open:
                    self.is_open = False
                    self._on_change(False)
                    log.warning(
                        "target %s reachable again after %.0fs; resuming", self.target, time.monotonic() - started
                    )
                return time.monotonic() - started
            if not self.is_open:
                self.is_open = True
                self.outages += 1
                self._on_change(True)
                log.error("target %s unreachable (probe %d); holding writes until it answers", self.target, status)
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.max_seconds)
