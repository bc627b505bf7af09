"""Where records go after a stage: downstream, a retry tier, or the dead-letter topic. Written once."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import orjson
from faust.exceptions import PartitionsMismatch
from faust.streams import _current_event, current_event
from faust.types import EventT, TopicT

from pipeline.audit import Step, failure_event
from pipeline.deadletter import (
    DISCARD_HEADER,
    FailureInfo,
    failure_headers,
    failure_info,
    parse_failure_headers,
    retry_schedule,
)
from pipeline.errors import AwaitedWriteError
from pipeline.metrics import DEAD_LETTERS, RETRIES
from pipeline.observe import route_labels
from pipeline.staging import Staged, StagedBatch, staged_batch

from .app import IdempotentProducer, app, config, settings
from .topics import audit_events, dead_letters, retry_tiers

log = logging.getLogger("cdrsync.routing")
_EXIT_UNDELIVERABLE = 70
_APPLY_ATTEMPTS = 120
_pending: ContextVar[list[tuple[TopicT, Any]] | None] = ContextVar("cdrsync_pending_deliveries", default=None)


def now_ms() -> int:
    """Wall-clock milliseconds."""
    return int(time.time() * 1000)


def headers_of(event: EventT) -> list[tuple[str, bytes]]:
    """The message headers as a list of (name, bytes)."""
    headers: Any = event.message.headers or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def origin_of(event: EventT) -> tuple[str, int, int]:
    """(topic, partition, offset) of the message being processed."""
    return event.message.topic, event.message.partition, event.message.offset


@dataclass(frozen=True)
class Carried:
    """A Kafka record as it travels on to a retry tier or the dead-letter topic: value and key unchanged."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    origin: tuple[str, int, int]

    @classmethod
    def of(cls, event: EventT) -> Carried:
        """The message being processed."""
        return cls(event.message.key, event.message.value, headers_of(event), origin_of(event))

    @property
    def failure(self) -> FailureInfo | None:
        """Its earlier failures, from the headers."""
        return parse_failure_headers(self.headers)

    @property
    def discarded(self) -> bool:
        """Whether an operator discarded it (`cdrsync dlq discard`): resolved without being written."""
        return any(name == DISCARD_HEADER for name, _ in self.headers)

    @property
    def identity(self) -> str:
        """Stable across retry tiers and replays: the position where it first failed, else where it is now."""
        failure = self.failure
        topic, partition, offset = (
            (failure.origin_topic, failure.origin_partition, failure.origin_offset) if failure else self.origin
        )
        return f"{topic}[{partition}]@{offset}"


async def deliver(
    topic: TopicT,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | None = None,
    partition: int | None = None,
) -> None:
    """Send and wait for the broker's acknowledgement (acks=all).

    If Kafka cannot take the record, the worker exits at once: the input offset is then never
    committed and the record is processed again after the restart, instead of being acked and lost.
    """
    try:
        future = await topic.send(key=key, value=value, headers=headers, partition=partition)
        pending = _pending.get()
        if pending is not None:  # in a batch (batched): acknowledged together at its end
            pending.append((topic, future))
            return
        await future
    except Exception:
        log.critical("cannot deliver to %s; exiting so the input is not committed", topic, exc_info=True)
        os._exit(_EXIT_UNDELIVERABLE)


@asynccontextmanager
async def batched(size: int) -> AsyncIterator[None]:
    """Process a batch of input records (agents/batches.py take_batches) as one: their outputs are sent without
    waiting for each acknowledgement, then all are awaited; only then are the table changes of the whole
    batch applied (pipeline/staging.py StagedBatch), and only then does Faust acknowledge the inputs.

    Anything else exits the worker without acknowledging the batch, which is then read again: a
    failure to deliver, a bug escaping, or a stop in the middle (Faust would acknowledge the batch as
    its generator closes).
    """
    pending: list[tuple[TopicT, Any]] = []
    token = _pending.set(pending)
    try:
        with staged_batch(current_event) as tables:
            yield
    except asyncio.CancelledError:
        log.warning("stopped in the middle of a batch of %d; exiting without acknowledging it", size)
        os._exit(0)
    except Exception:
        log.critical("a batch of %d failed unexpectedly; exiting without acknowledging it", size, exc_info=True)
        os._exit(_EXIT_UNDELIVERABLE)
    finally:
        _pending.reset(token)
    try:
        if pending and isinstance(app.producer, IdempotentProducer):
            app.producer.send_now()  # the outputs go now, not after the producer's linger (agents/sending.py)
        for topic, future in pending:
            try:
                await future
            except Exception:
                log.critical("cannot deliver to %s; exiting so the input is not committed", topic, exc_info=True)
                os._exit(_EXIT_UNDELIVERABLE)
        await _apply_batch(tables)
    except asyncio.CancelledError:  # as in the body: the batch's table changes would be lost, its inputs acked
        log.warning("stopped while a batch of %d was delivered or applied; exiting without acknowledging it", size)
        os._exit(0)


@contextmanager
def processing(event: EventT) -> Iterator[None]:
    """Faust's current event is this one while it is handled: a table writes its changelog to the
    partition of the event current when it changes (batches hold several, of several partitions)."""
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


async def _apply_batch(batch: StagedBatch) -> None:
    """apply_tables for a batch: each key's last change, applied as the record that made it."""

    def apply() -> None:
        for event, table, key, value in batch.final_changes():
            with processing(event):
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value

    await _apply_with_retries(apply)


async def apply_tables(*tables: Staged) -> None:
    """Apply staged table changes once the outputs they describe are acknowledged."""

    def apply() -> None:
        for table in tables:
            table.apply()

    await _apply_with_retries(apply)


async def _apply_with_retries(apply: Callable[[], None]) -> None:
    """Write table changes. Right after start-up Faust may not yet see a changelog topic's partitions and
    refuses the write (PartitionsMismatch) until its metadata refreshes: wait for it. Any other failure
    exits the worker: the outputs are sent but the state is not, so the input must be processed again."""
    failure: BaseException | None = None
    for attempt in range(_APPLY_ATTEMPTS):
        try:
            apply()
            return
        except PartitionsMismatch:
            log.warning("table metadata not ready (attempt %d); retrying", attempt + 1)
            await asyncio.sleep(1.0)
        except Exception as error:
            failure = error
            break
    log.critical("cannot update tables; exiting so the input is processed again", exc_info=failure)
    os._exit(_EXIT_UNDELIVERABLE)


async def dead_letter(stage: str, event: EventT | Carried, error: BaseException, attempts: int = 1) -> None:
    """Send the original record, unchanged, to the dead-letter topic with the failure in headers."""
    carried = event if isinstance(event, Carried) else Carried.of(event)
    info = failure_info(
        stage, error, attempts=attempts, now_ms=now_ms(), origin=carried.origin, previous=carried.failure
    )
    await dead_letter_info(carried, info)


def _log_fields(info: FailureInfo, site: str, target: str) -> dict[str, object]:
    """Correlation fields of a failed record for the JSON logs."""
    return {
        "stage": info.stage,
        "site": site,
        "target": target,
        "error_class": info.error_class,
        "attempts": info.attempts,
        "source_topic": info.origin_topic,
        "source_partition": info.origin_partition,
        "source_offset": info.origin_offset,
    }


async def dead_letter_info(carried: Carried, info: FailureInfo) -> None:
    """Send a record to the dead-letter topic with its failure, count, log and audit it."""
    site, target = route_labels(config, carried.origin[0], carried.value)
    DEAD_LETTERS.labels(info.stage, site, target, info.error_class).inc()
    log.error(
        "dead letter: stage=%s error_class=%s origin=%s[%d]@%d attempts=%d: %s",
        info.stage,
        info.error_class,
        info.origin_topic,
        info.origin_partition,
        info.origin_offset,
        info.attempts,
        info.message,
        extra=_log_fields(info, site, target),
    )
    await deliver(dead_letters, carried.key, carried.value, failure_headers(info))
    await _audit_failure("dead_lettered", carried, info, site, f"{info.stage} {info.error_class}: {info.message}")


_BACKFLOW_STAGES = ("backflow", "writeback")


async def _audit_failure(step: Step, carried: Carried, info: FailureInfo, site: str, detail: str) -> None:
    """The audit event of a record sent to a retry tier or the dead-letter topic (DESIGN.md decision 9), once
    Kafka has it there: whichever stage it failed in, whatever it is (the stages' own audit events need a
    decoded record; this one names even a record that could not be read)."""
    event = failure_event(
        step,
        carried.value,
        (info.origin_topic, info.origin_partition, info.origin_offset),
        site=site,
        detail=detail,
        trigger="backflow" if info.stage in _BACKFLOW_STAGES else "all",
        at_ms=info.last_failure_ms,
    )
    await deliver_audit(event)


async def deliver_audit(event: dict[str, Any]) -> None:
    """Send one audit event (pipeline/audit.py) to the audit topic, keyed by the resource it is about, and wait
    for Kafka's acknowledgement."""
    key = str(event["target_id"] or event["source_id"]).encode()
    await deliver(audit_events, key, orjson.dumps(event))


async def retry_later(stage: str, event: EventT | Carried, error: BaseException, attempts: int) -> bool:
    """Move a record to the next retry tier (True), or to the dead-letter topic after the last one (False)."""
    carried = event if isinstance(event, Carried) else Carried.of(event)
    previous = carried.failure
    info = failure_info(stage, error, attempts=attempts, now_ms=now_ms(), origin=carried.origin, previous=previous)
    # A write that waits for another one, which may take hours (pipeline/errors.py): longer than the tiers.
    stay = info.first_failure_ms + settings.await_write_seconds * 1000 if isinstance(error, AwaitedWriteError) else None
    delays = [tier.delay_seconds for tier in config.topics.retry_tiers]
    schedule = retry_schedule(previous, delays, stay_until_ms=stay, now_ms=info.last_failure_ms)
    if schedule is None:
        await dead_letter_info(carried, info)
        return False
    tier, delay_seconds = schedule
    tiers = config.topics.retry_tiers
    due = info.last_failure_ms + int(delay_seconds * 1000)
    info = FailureInfo(**{**info.__dict__, "tier": tier, "due_ms": due})
    site, target = route_labels(config, carried.origin[0], carried.value)
    RETRIES.labels(stage, site, target, str(tier), info.error_class).inc()
    log.warning(
        "retry tier %d (%s): stage=%s error_class=%s origin=%s[%d]@%d",
        tier,
        tiers[tier].name,
        stage,
        info.error_class,
        info.origin_topic,
        info.origin_partition,
        info.origin_offset,
        extra={**_log_fields(info, site, target), "tier": tier},
    )
    await deliver(retry_tiers[tier], carried.key, carried.value, failure_headers(info))
    detail = f"{stage} {info.error_class}, attempt {info.attempts}: tier {tier} ({tiers[tier].name})"
    await _audit_failure("retried", carried, info, site, f"{detail}: {info.message}")
    return True
