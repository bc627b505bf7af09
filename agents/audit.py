"""Audit wiring: stages emit events to audit.v1; the audit store (pipeline/auditstore.py) puts them in PostgreSQL for
ops to query."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any

from mode import Service

from pipeline.audit import Step, audit_event
from pipeline.auditstore import AuditStore, run_in_thread
from pipeline.records import NormalizedResource, RoutedResource

from .app import app, config, settings
from .routing import deliver_audit
from .topics import audit_events as audit_topic

log = logging.getLogger("cdrsync.audit")
_EXIT_UNDELIVERABLE = 70


async def emit_audit(step: Step, record: NormalizedResource | RoutedResource, **fields: Any) -> None:
    """Send one audit event and wait for Kafka's acknowledgement."""
    await deliver_audit(audit_event(step, record, **fields))


def _dsn() -> str:
    return settings.pg_dsn(settings.audit_database)


@app.service
class AuditWriter(Service):
    """The audit store (pipeline/auditstore.py) in a thread of the worker: starts with it, stops with it; a
    store that fails takes the worker down (to be restarted), its batch not committed."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.store = AuditStore(
            settings.kafka_bootstrap,
            f"{app.conf.id}-audit",
            audit_topic.get_topic_name(),
            config.topics.name("dlq"),
            _dsn(),
            previous_group=app.conf.id,  # the group of the Faust agent that stored them before
            batch_max=settings.stage_batch_max,
            gather_seconds=settings.audit_batch_seconds,
        )
        self.thread: threading.Thread | None = None

    async def on_start(self) -> None:
        self.thread = run_in_thread(self.store, _failed)

    async def on_stop(self) -> None:
        self.store.stop()
        if self.thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 30)


def _failed(error: BaseException) -> None:
    log.critical("audit store failed; exiting so its batch is read again", exc_info=error)
    os._exit(_EXIT_UNDELIVERABLE)
