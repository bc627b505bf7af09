"""Holding a write while its destination cannot be reached: one circuit breaker per destination, and the rule
for when a hold must end without its write.

The sink holds for a target (central); write-back holds for a hospital (its database or FHIR endpoint). Both
hold in an agent, with the record unacknowledged, and Faust waits for every record in processing before it
gives partitions up or stops: a hold that went on through a rebalance would keep the whole group waiting.
So a hold gives way (`hold_interrupted`) when the worker stops or its partitions are being reassigned, and
the worker exits without acknowledging (`exit_holding`): the held record and those after it are read again
by the partition's next owner.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import NoReturn

from pipeline.breaker import CircuitBreaker
from pipeline.metrics import BREAKER_OPEN, TARGET_OUTAGES
from pipeline.observe import record_fields
from pipeline.records import RoutedResource

from .app import app

__all__ = ["EXIT_HOLD_GIVEN_UP", "breaker", "exit_holding", "hold_interrupted"]

log = logging.getLogger("cdrsync.holding")
EXIT_HOLD_GIVEN_UP = 75  # EX_TEMPFAIL: a rebalance came while a write waited for an unreachable destination
_breakers: dict[str, CircuitBreaker] = {}


def breaker(destination: str, probe: Callable[[], Awaitable[int]]) -> CircuitBreaker:
    """The destination's circuit breaker (made on first use with this probe); its state is the gauge
    cdrsync_target_breaker_open{target=destination}, and each opening counts in cdrsync_target_outages_total."""
    if destination not in _breakers:

        def changed(is_open: bool) -> None:
            BREAKER_OPEN.labels(destination).set(1 if is_open else 0)
            if is_open:
                TARGET_OUTAGES.labels(destination).inc()

        _breakers[destination] = CircuitBreaker(destination, probe, on_change=changed)
    return _breakers[destination]


def hold_interrupted() -> str | None:
    """Why a write held for an unreachable destination must not hold on, if it must not."""
    if app.should_stop:
        return "the worker is stopping"
    if not app.consumer.flow_active:  # Faust stops the flow when partitions are revoked, before it waits for them
        return "its partitions are being reassigned"
    return None


def exit_holding(record: RoutedResource, reason: str) -> NoReturn:
    """End a hold the worker cannot keep: exit without acknowledging the held record (it is read again); on a
    rebalance with an error, so that the service manager starts the worker again and it rejoins its group."""
    stopping = app.should_stop
    log.warning(
        "%s: holding its write until %s answers, but %s; exiting without acknowledging it (it is read again%s)",
        record.target_ref,
        record.target,
        reason,
        "" if stopping else "; this worker, started again, rejoins its group",
        extra=record_fields(record),
    )
    os._exit(0 if stopping else EXIT_HOLD_GIVEN_UP)
