"""The retry tiers' forwarder (pipeline/retrytiers.py) as a service of the worker, in a thread of its own."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

from mode import Service

from pipeline.retrytiers import RetryForwarder, Tier

from .app import app, config, settings

log = logging.getLogger("cdrsync.retry")
_EXIT_UNDELIVERABLE = 70


@app.service
class RetryTiers(Service):
    """Starts with the worker, stops with it; a forwarder that fails takes the worker down (to be restarted)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.forwarder = RetryForwarder(
            settings.kafka_bootstrap,
            f"{app.conf.id}-retry",
            [Tier(tier.name, tier.delay_seconds) for tier in config.topics.retry_tiers],
            config.topics.name("ready"),
        )
        self.thread = threading.Thread(target=self._run, name="retry-tiers", daemon=True)

    def _run(self) -> None:
        try:
            self.forwarder.run()
        except Exception:
            log.critical("retry tier forwarder failed; exiting so nothing is acknowledged unforwarded", exc_info=True)
            os._exit(_EXIT_UNDELIVERABLE)

    async def on_start(self) -> None:
        self.thread.start()

    async def on_stop(self) -> None:
        self.forwarder.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join, 30)
