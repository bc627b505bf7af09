"""`cdrsync monitor`: source health and consumer lag for Prometheus, collected at scrape time.

The workers export what they do; this process exports what only an outside view can see, on its own
/metrics port:
  cdrsync_consumer_lag_records          end offset - committed offset per consumer group and topic
  cdrsync_topic_records                 records a topic holds now (latest - earliest offset): dead letters
  cdrsync_connector_state / _tasks      Debezium connector and task states from the Connect REST API
  cdrsync_replication_slot_*            replication-slot lag and retained WAL in bytes, slot activity
  cdrsync_target_up / _probe_status_code   each target's capability statement answers
  cdrsync_route_info                    the configured routes (so a route that never wrote is visible)
  cdrsync_monitor_collect_success       whether each source answered this scrape
Each source is asked with a short timeout; one that does not answer only zeroes its success gauge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import Config
from .connect import load_connectors
from .demo import site_dsn
from .fhirclient import FhirClient
from .kafkaadmin import committed_offsets
from .settings import Settings

__all__ = [
    "CONNECTOR_STATES",
    "SourceCollector",
    "consumed_topics",
    "consumer_lag",
    "parse_volumes",
]

log = logging.getLogger("cdrsync.monitor")
CONNECTOR_STATES = ("RUNNING", "PAUSED", "STOPPED", "FAILED", "UNASSIGNED", "RESTARTING", "MISSING")
_TIMEOUT = 5.0
_SLOTS_SQL = """
SELECT slot_name, active,
       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint,
       COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint
FROM pg_replication_slots WHERE database = current_database() AND slot_name = %s
"""

Offsets = Mapping[tuple[str, int], int]


def consumed_topics(config: Config) -> list[str]:
    """The topics the workers consume (agents/topics.py): every source (and capture), the stages' topics, retries."""
    topics = [config.source_topic(site) for site in [*config.source_sites(), *config.capture_sites()]]
    topics += [config.topics.name(key) for key in ("normalized", "identified", "ready", "writeback")]
    return topics + [tier.name for tier in config.topics.retry_tiers]


def consumer_lag(earliest: Offsets, latest: Offsets, committed: Offsets, topics: Iterable[str]) -> dict[str, int]:
    """Records not yet consumed per topic; a partition without a commit counts from its earliest offset."""
    wanted = set(topics)
    lag = dict.fromkeys(wanted, 0)
    for (topic, partition), end in latest.items():
        if topic in wanted:
            start = committed.get((topic, partition), earliest.get((topic, partition), 0))
            lag[topic] += max(0, end - start)
    return lag


def parse_volumes(text: str) -> dict[str, Path]:
    """ "name=path,name=path" → {name: path}."""
    volumes = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, path = item.partition("=")
        if not name or not path:
            raise ValueError(f"CDRSYNC_MONITOR_VOLUMES: {item!r} is not name=path")
        volumes[name.strip()] = Path(path.strip())
    return volumes


class _Families:
    """The metric families of one scrape, created empty so that `describe` needs no source."""

    def __init__(self) -> None:
        def gauge(name: str, documentation: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, documentation, labels=labels)

        self.lag = gauge(
            "cdrsync_consumer_lag_records",
            "End offset - committed offset; kind as for cdrsync_topic_records, site for a source topic",
            ["group", "topic", "kind", "site"],
        )
        self.records = gauge(
            "cdrsync_topic_records",
            "Records a topic holds (latest - earliest offset); kind is its topics.yaml key, source or retry",
            ["topic", "kind"],
        )
        self.connector = gauge(
            "cdrsync_connector_state", "1 for the connector's current state", ["site", "connector", "state"]
        )
        self.tasks = gauge("cdrsync_connector_tasks", "Connector tasks in each state", ["site", "connector", "state"])
        self.slot_lag = gauge(
            "cdrsync_replication_slot_lag_bytes",
            "WAL written but not yet confirmed by Debezium (current LSN - confirmed_flush_lsn)",
            ["site", "slot"],
        )
        self.slot_retained = gauge(
            "cdrsync_replication_slot_retained_wal_bytes",
            "WAL the server keeps for the slot (current LSN - restart_lsn)",
            ["site", "slot"],
        )
        self.slot_active = gauge("cdrsync_replication_slot_active", "1 when a client is attached", ["site", "slot"])
        self.target_up = gauge("cdrsync_target_up", "1 when the target's capability statement answers 2xx", ["target"])
        self.target_status = gauge(
            "cdrsync_target_probe_status_code", "HTTP status of GET metadata, 0 when unreachable", ["target"]
        )
        self.routes = gauge("cdrsync_route_info", "One series per configured route", ["site", "target", "trigger"])
        self.success = gauge("cdrsync_monitor_collect_success", "1 when the source answered this scrape", ["collector"])
        self.duration = gauge("cdrsync_monitor_collect_duration_seconds", "Time spent asking the source", ["collector"])

    def all(self) -> list[Metric]:
        return list(vars(self).values())


class SourceCollector(Collector):
    """Asks Kafka, Kafka Connect, each site's PostgreSQL and each target, once per scrape."""

    def __init__(self, settings: Settings, config: Config, groups: list[str]) -> None:
        self.settings, self.config, self.groups = settings, config, groups
        self._admin: AdminClient | None = None

    def describe(self) -> Iterator[Metric]:
        """The metric names, without asking any source."""
        yield from _Families().all()

    def collect(self) -> Iterator[Metric]:
        """One scrape: every source in turn."""
        families = _Families()
        for site in self.config.source_sites():
            for route in site.routes:
                families.routes.add_metric([site.site, route.target, route.trigger], 1)
        steps: list[tuple[str, Callable[[_Families], None]]] = [
            ("kafka", self._kafka),
            ("connect", self._connect),
            ("postgres", self._postgres),
            ("target", self._targets),
        ]
        for name, step in steps:
            started = time.monotonic()
            ok = True
            try:
                step(families)
            except Exception as exc:  # one source down must not hide the others
                ok = False
                log.warning("monitor: %s did not answer: %s", name, exc)
                # An old client kept timing out after a broker restart: the next scrape starts anew.
                if name == "kafka":
                    self._admin = None
            families.success.add_metric([name], 1 if ok else 0)
            families.duration.add_metric([name], time.monotonic() - started)
        yield from families.all()

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        return self._admin

    def _kafka(self, families: _Families) -> None:
        admin = self._admin_client()
        metadata = admin.list_topics(timeout=_TIMEOUT).topics
        captured = [*self.config.source_sites(), *self.config.capture_sites()]  # capture: central's back-flow
        kinds = {self.config.source_topic(s): "source" for s in captured}
        kinds |= {spec.name: key for key, spec in self.config.topics.topics.items()}
        kinds |= {tier.name: "retry" for tier in self.config.topics.retry_tiers}
        declared = list(kinds)
        partitions = [TopicPartition(t, p) for t in declared if t in metadata for p in metadata[t].partitions]
        earliest = _offsets(admin, partitions, OffsetSpec.earliest())
        latest = _offsets(admin, partitions, OffsetSpec.latest())
        for topic in declared:
            if topic in metadata:
                held = sum(v - earliest.get(k, 0) for k, v in latest.items() if k[0] == topic)
                families.records.add_metric([topic, kinds[topic]], held)
        sites = {self.config.source_topic(s): s.site for s in captured}
        topics = [t for t in consumed_topics(self.config) if t in metadata]
        for group in self.groups:
            lag = consumer_lag(earliest, latest, committed_offsets(admin, group, _TIMEOUT), topics)
            for topic, value in sorted(lag.items()):
                families.lag.add_metric([group, topic, kinds[topic], sites.get(topic, "")], value)

    def _connect(self, families: _Families) -> None:
        url = f"{self.settings.connect_url.rstrip('/')}/connectors?expand=status"
        with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
            registered: dict[str, Any] = json.loads(response.read())
        by_connector = {s.source.connector: s.site for s in self.config.source_sites() if s.source}
        for connector, site in sorted(by_connector.items()):
            status = registered.get(connector, {}).get("status", {})
            state = status.get("connector", {}).get("state", "MISSING")
            for candidate in CONNECTOR_STATES:
                families.connector.add_metric([site, connector, candidate], 1 if state == candidate else 0)
            task_states = [task.get("state", "") for task in status.get("tasks", [])]
            for candidate in CONNECTOR_STATES[:-1]:
                families.tasks.add_metric([site, connector, candidate], task_states.count(candidate))

    def _postgres(self, families: _Families) -> None:
        slots = {
            spec.name: spec.config.get("slot.name", "debezium")
            for spec in load_connectors(self.settings.config_root / "connectors" / "debezium", self.config)
        }
        s = self.settings
        for site in self.config.source_sites():
            assert site.source is not None
            slot = slots.get(site.source.connector)
            if slot is None:
                continue
            dsn = site_dsn(site, s.pg_host, s.pg_port, s.pg_user, s.pg_password_value)
            with psycopg.connect(dsn, connect_timeout=max(1, int(_TIMEOUT))) as conn, conn.cursor() as cur:
                row = cur.execute(_SLOTS_SQL, (slot,)).fetchone()
            families.slot_active.add_metric([site.site, slot], 1 if row and row[1] else 0)
            if row is not None:
                families.slot_lag.add_metric([site.site, slot], float(row[2]))
                families.slot_retained.add_metric([site.site, slot], float(row[3]))

    def _targets(self, families: _Families) -> None:
        targets = sorted({route.target for site in self.config.source_sites() for route in site.routes})
        statuses = asyncio.run(_probe_all(self.config, targets))
        for target, status in zip(targets, statuses, strict=True):
            families.target_up.add_metric([target], 1 if 200 <= status < 300 else 0)
            families.target_status.add_metric([target], status)


async def _probe_all(config: Config, targets: list[str]) -> list[int]:
    async def probe(target: str) -> int:
        async with FhirClient(config.target(target), connections=1) as client:
            try:
                return await asyncio.wait_for(client.probe(), _TIMEOUT)
            except TimeoutError:
                return 0

    return list(await asyncio.gather(*(probe(t) for t in targets)))


def _offsets(admin: AdminClient, partitions: list[TopicPartition], spec: OffsetSpec) -> dict[tuple[str, int], int]:
    if not partitions:
        return {}
    futures = admin.list_offsets({tp: spec for tp in partitions}, request_timeout=_TIMEOUT)
    return {(tp.topic, tp.partition): future.result().offset for tp, future in futures.items()}


def serve(settings: Settings, config: Config, groups: list[str], port: int) -> None:
    """Serve /metrics until SIGTERM or SIGINT."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

    from .metrics import VolumeCollector

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    registry.register(SourceCollector(settings, config, groups))
    registry.register(VolumeCollector(parse_volumes(settings.monitor_volumes)))
    server, thread = start_http_server(port, addr="0.0.0.0", registry=registry)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    log.info("monitor: /metrics on port %d for consumer groups %s", port, ", ".join(groups))
    stop.wait()
    server.shutdown()
    thread.join(timeout=5)
