"""`cdrsync status`: one screen per route from the workers' and the monitor's metrics, for people without Grafana.

A route is FAILING (exit 1) when its Debezium connector or a task is not RUNNING, its target does not
answer, no worker answers, or it is stale: no successful write for STALE_SECONDS while changes of its
site wait unread. Dead letters, records held for a missing identifier, retries and a large
replication-slot backlog are warnings: they need a look, but data still flows.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .config import Config
from .errors import TargetUnavailableError

__all__ = [
    "STALE_SECONDS",
    "RouteStatus",
    "Sample",
    "WorkerView",
    "fetch_samples",
    "fetch_worker",
    "histogram_quantile",
    "parse_metrics",
    "render",
    "route_statuses",
    "samples_of",
]

STALE_SECONDS = 15 * 60  # the case study's SLA: no successful sync for 15 minutes is critical
SLOT_WARN_BYTES = 1 << 30


@dataclass(frozen=True)
class Sample:
    """One sample of one metric."""

    name: str
    labels: dict[str, str]
    value: float


def samples_of(families: Iterable[Metric]) -> list[Sample]:
    """Flatten metric families (parsed or collected in-process) to samples."""
    return [Sample(s.name, dict(s.labels), float(s.value)) for family in families for s in family.samples]


def parse_metrics(text: str) -> list[Sample]:
    """Samples of a Prometheus text exposition."""
    return samples_of(text_string_to_metric_families(text))


@dataclass(frozen=True)
class WorkerView:
    """What one worker said: its samples and its readiness, or why it could not be asked."""

    url: str
    samples: list[Sample] = field(default_factory=list)
    ready: dict[str, Any] | None = None
    error: str | None = None


def fetch_worker(url: str, timeout: float = 5.0) -> WorkerView:
    """GET /metrics and /readyz of one worker."""
    base = url.rstrip("/").removesuffix("/metrics")
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as response:
            samples = parse_metrics(response.read().decode())
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        return WorkerView(base, error=f"not reachable: {exc}")
    try:
        with urllib.request.urlopen(f"{base}/readyz", timeout=timeout) as response:
            ready = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503 carries the failing checks
        ready = orjson.loads(exc.read() or b"{}")
    except (urllib.error.URLError, TimeoutError, ValueError) as exc:
        ready = {"ready": False, "error": str(exc)}
    return WorkerView(base, samples, ready)


def fetch_samples(url: str, timeout: float = 10.0) -> list[Sample]:
    """Samples of a /metrics endpoint (the monitor's); TargetUnavailableError when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_metrics(response.read().decode())
    except (urllib.error.URLError, TimeoutError) as exc:
        raise TargetUnavailableError(f"{url} does not answer: {exc}") from None


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over cumulative (upper bound, count) buckets; None without data."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


@dataclass
class RouteStatus:
    """Everything `cdrsync status` says about one site → target route."""

    site: str
    target: str
    last_success_age: float | None = None
    latency_p50: float | None = None
    latency_p99: float | None = None
    writes_succeeded: float = 0
    writes_failed: float = 0
    lag: float | None = None
    held_identifier: float = 0
    held_review: float = 0
    held_reference: float = 0
    retries: float = 0
    dead_letters: float = 0
    conflicts: float = 0
    connector: str = "?"
    tasks: str = "?"
    slot_lag_bytes: float | None = None
    target_up: bool | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """FAILING, WARNING or OK."""
        return "FAILING" if self.failures else "WARNING" if self.warnings else "OK"


def _total(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _has(samples: Iterable[Sample], name: str, **labels: str) -> bool:
    return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items()) for s in samples)


def _route_from_workers(status: RouteStatus, samples: list[Sample], now: float) -> None:
    route = {"site": status.site, "target": status.target}
    last = [s.value for s in samples if s.name == "cdrsync_last_successful_write_timestamp_seconds" and _is(s, route)]
    status.last_success_age = now - max(last) if last else None
    buckets: dict[float, float] = {}
    for s in samples:
        if s.name == "cdrsync_end_to_end_latency_seconds_bucket" and _is(s, route):
            bound = float(s.labels["le"])
            buckets[bound] = buckets.get(bound, 0) + s.value
    status.latency_p50 = histogram_quantile(0.5, list(buckets.items()))
    status.latency_p99 = histogram_quantile(0.99, list(buckets.items()))
    status.writes_succeeded = _total(samples, "cdrsync_writes_total", result="succeeded", **route)
    status.writes_failed = _total(samples, "cdrsync_writes_total", result="failed", **route)
    status.held_identifier = _total(samples, "cdrsync_held_records", site=status.site, reason="missing_identifier")
    status.held_review = _total(samples, "cdrsync_held_records", site=status.site, reason="identity_review")
    status.held_reference = _total(samples, "cdrsync_held_records", site=status.site, reason="reference")
    status.retries = _total(samples, "cdrsync_retries_total", **route)
    status.dead_letters = _total(samples, "cdrsync_dead_letters_total", site=status.site)
    status.conflicts = _total(samples, "cdrsync_conflicts_total", **route)


def _is(sample: Sample, labels: dict[str, str]) -> bool:
    return all(sample.labels.get(k) == v for k, v in labels.items())


def _route_from_monitor(status: RouteStatus, samples: list[Sample], group: str) -> None:
    site = {"site": status.site}
    lag = [s.value for s in samples if s.name == "cdrsync_consumer_lag_records" and _is(s, {**site, "group": group})]
    status.lag = sum(lag) if lag else None
    states = [s for s in samples if s.name == "cdrsync_connector_state" and _is(s, site) and s.value == 1]
    if states:
        status.connector = f"{states[0].labels['connector']} {states[0].labels['state']}"
    tasks = {s.labels["state"]: s.value for s in samples if s.name == "cdrsync_connector_tasks" and _is(s, site)}
    if tasks:
        running, total = tasks.get("RUNNING", 0), sum(tasks.values())
        status.tasks = f"{running:.0f}/{total:.0f} tasks RUNNING"
    slot = [s.value for s in samples if s.name == "cdrsync_replication_slot_retained_wal_bytes" and _is(s, site)]
    status.slot_lag_bytes = max(slot) if slot else None
    up = [s.value for s in samples if s.name == "cdrsync_target_up" and s.labels.get("target") == status.target]
    status.target_up = bool(min(up)) if up else None


def _judge(status: RouteStatus, uptime: float | None) -> None:
    if not status.connector.endswith(" RUNNING") or not _tasks_all_running(status.tasks):
        status.failures.append(f"connector {status.connector}, {status.tasks}")
    if status.target_up is False:
        status.failures.append(f"target {status.target} does not answer")
    quiet_for = status.last_success_age if status.last_success_age is not None else uptime
    if status.lag and quiet_for is not None and quiet_for > STALE_SECONDS:
        status.failures.append(f"stale: {status.lag:.0f} changes unread and nothing written for {_age(quiet_for)}")
    if status.dead_letters:
        status.warnings.append("dead letters")
    if status.held_identifier:
        status.warnings.append("patients without the shared identifier")
    if status.held_review:
        status.warnings.append("patients under identity review (cdrsync identity list)")
    if status.retries:
        status.warnings.append("retries")
    if status.slot_lag_bytes is not None and status.slot_lag_bytes > SLOT_WARN_BYTES:
        status.warnings.append("replication slot keeps much WAL")


def _tasks_all_running(text: str) -> bool:
    running, _, rest = text.partition("/")
    return rest.split(" ", 1)[0] == running and running not in ("?", "0")


def route_statuses(
    config: Config, workers: list[WorkerView], monitor: list[Sample], group: str, now: float | None = None
) -> list[RouteStatus]:
    """One status per configured route, judged."""
    now = time.time() if now is None else now
    samples = [s for w in workers for s in w.samples]
    starts = [s.value for s in samples if s.name == "process_start_time_seconds"]
    uptime = now - max(starts) if starts else None
    statuses = []
    for site in config.source_sites():
        for route in site.routes:
            status = RouteStatus(site.site, route.target)
            _route_from_workers(status, samples, now)
            _route_from_monitor(status, monitor, group)
            _judge(status, uptime)
            if not any(w.samples for w in workers):
                status.failures.append("no worker answers")
            statuses.append(status)
    return statuses


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s" if value < 10 else f"{value:.0f} s"


def _bytes(value: float | None) -> str:
    if value is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _render_route(status: RouteStatus) -> list[str]:
    last = (
        "none since the worker started" if status.last_success_age is None else f"{_age(status.last_success_age)} ago"
    )
    writes = f"{status.writes_succeeded:.0f} written, {status.writes_failed:.0f} failed attempts"
    lines = [
        f"{status.site} -> {status.target}: {status.verdict}",
        f"  last successful write  {last}",
        f"  latency p50 / p99      {_seconds(status.latency_p50)} / {_seconds(status.latency_p99)}  ({writes})",
        f"  lag                    {'?' if status.lag is None else f'{status.lag:.0f}'} changes not yet read",
        f"  held                   {status.held_identifier:.0f} without shared identifier, "
        f"{status.held_review:.0f} under identity review, {status.held_reference:.0f} waiting for a reference",
        f"  retrying               {status.retries:.0f} sent to a retry tier",
        f"  dead letters           {status.dead_letters:.0f}",
        f"  conflicts              {status.conflicts:.0f}",
        f"  connector              {status.connector}, {status.tasks}; slot keeps {_bytes(status.slot_lag_bytes)}",
        f"  target                 {_target(status.target_up)}",
    ]
    lines += [f"  FAILING: {reason}" for reason in status.failures]
    lines += [f"  warning: {reason}" for reason in status.warnings]
    return lines


def _target(up: bool | None) -> str:
    return "?" if up is None else "reachable" if up else "NOT reachable"


def render(statuses: list[RouteStatus], workers: list[WorkerView], monitor: list[Sample], group: str) -> str:
    """The whole screen: workers, then one block per route, then the shared topics."""
    lines = []
    for worker in workers:
        if worker.error:
            lines.append(f"worker {worker.url}: {worker.error}")
        else:
            ready = worker.ready or {}
            failing = [name for name, ok in (ready.get("checks") or {}).items() if not ok]
            state = "ready" if ready.get("ready") else f"NOT ready ({', '.join(failing) or ready.get('error', '?')})"
            lines.append(f"worker {worker.url}: {state}; counts below are since it started")
    lines.append("")
    for status in statuses:
        lines += [*_render_route(status), ""]
    shared = [
        f"{s.labels['topic']} {s.value:.0f}"
        for s in monitor
        if s.name == "cdrsync_consumer_lag_records" and s.labels.get("group") == group and not s.labels.get("site")
    ]
    lines.append(f"shared topics, not yet read: {', '.join(shared) or '?'}")
    for kind, what in (("dlq", "dead-letter"), ("conflicts", "conflicts")):
        held = [s.value for s in monitor if s.name == "cdrsync_topic_records" and s.labels.get("kind") == kind]
        if held:
            lines.append(f"{what} topic holds {held[0]:.0f} records (cdrsync tap {kind})")
    return "\n".join(lines)
