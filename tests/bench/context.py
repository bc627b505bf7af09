"""One benchmark run: the bench site, its phases (each with its own topics and consumer group), loading rows."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.config import Config, SiteConfig
from pipeline.settings import Settings

from . import offsets, provision
from .dataset import load_rows
from .offsets import Offsets
from .worker import BenchWorker

__all__ = ["Bench", "Phase"]


@dataclass
class Phase:
    """A phase's namespace: pipeline topics `bench.<run>.<name>.*`, consumer group `bench-<run>-<name>`."""

    name: str
    prefix: str
    app_id: str
    config: Config

    def pipeline_topics(self, source_topic: str) -> list[str]:
        t = self.config.topics
        return [
            source_topic,
            *(t.name(k) for k in ("normalized", "identified", "ready")),
            *(r.name for r in t.retry_tiers),
        ]

    def dead_letters(self, bootstrap: str) -> int:
        """Records on this phase's dead-letter topic."""
        return sum(offsets.end_offsets(bootstrap, self.config.topics.name("dlq")).values())


@dataclass
class Bench:
    settings: Settings
    home: Path  # $CDRSYNC_HOME/bench: config root, worker state and logs, Synthea cache
    root: Path  # the bench configuration root (provision.write_config_root)
    run_id: str
    hapi_url: str
    log: Callable[[str], None]

    @cached_property
    def config(self) -> Config:
        """The bench configuration without a phase's topic prefix (read once)."""
        return provision.load_bench_config(self.root, "")

    @cached_property  # read once: callers use it in loops over 100 000 rows
    def site(self) -> SiteConfig:
        return self.config.sites[provision.BENCH_SITE]

    @cached_property
    def source_topic(self) -> str:
        return self.config.source_topic(self.site)

    @property
    def dsn(self) -> str:
        return provision.admin_dsn(self.settings, provision.BENCH_DATABASE)

    @cached_property
    def carried(self) -> frozenset[str]:
        return frozenset(self.site.routes[0].resource_types or self.site.resource_types)

    def namespace(self, phase: str) -> str:
        """Source-id namespace of one phase's rows: fresh per run, so no run updates another's resources."""
        return f"{self.run_id}{phase}"

    def phase(self, name: str) -> Phase:
        prefix = f"bench.{self.run_id}.{name}."
        config = provision.load_bench_config(self.root, prefix)
        provision.apply_phase_topics(self.settings, config)
        return Phase(name, prefix, f"bench-{self.run_id}-{name}", config)

    def worker(self, phase: Phase, target_url: str, start: Offsets | None = None) -> BenchWorker:
        """A worker of the phase (not started); its group starts reading the source at `start` (default: its end)."""
        position = start if start is not None else offsets.end_offsets(self.settings.kafka_bootstrap, self.source_topic)
        offsets.commit_group(self.settings.kafka_bootstrap, phase.app_id, {self.source_topic: position})
        env = {
            "CDRSYNC_CONFIG_ROOT": str(self.root),
            "CDRSYNC_TOPIC_PREFIX": phase.prefix,
            "CENTRAL_FHIR_BASE_URL": target_url,
            "KAFKA_BOOTSTRAP": self.settings.kafka_bootstrap,
        }
        return BenchWorker(phase.app_id, self.home, env)

    def load(self, resources: list[dict[str, Any]], timeout: float = 600) -> tuple[Offsets, Offsets, float]:
        """Write rows into the bench table and wait until Debezium put every change on the source topic.

        Returns the source topic's end offsets before and after, and the seconds capture took."""
        bootstrap = self.settings.kafka_bootstrap
        before = offsets.end_offsets(bootstrap, self.source_topic)
        started = time.monotonic()
        load_rows(self.dsn, resources)
        after = offsets.wait_for_records(bootstrap, self.source_topic, before, len(resources), timeout)
        return before, after, time.monotonic() - started

    def wait_drained(self, phase: Phase, done: Callable[[], bool], timeout: float, poll: float = 1.0) -> None:
        """Until the phase's group has committed everything on its topics and `done()` holds."""
        deadline = time.monotonic() + timeout
        topics = phase.pipeline_topics(self.source_topic)
        while time.monotonic() < deadline:
            if offsets.group_lag(self.settings.kafka_bootstrap, phase.app_id, topics) == 0 and done():
                return
            time.sleep(poll)
        raise TimeoutError(f"phase {phase.name}: not drained after {timeout:.0f}s")
