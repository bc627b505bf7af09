"""`cdrsync status`: quantiles from buckets, a verdict per route, and the screen, read over real HTTP."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.cli import main
from pipeline.config import Config, load_config
from pipeline.status import WorkerView, histogram_quantile, parse_metrics, render, route_statuses

pytestmark = pytest.mark.unit
NOW = 1_800_000_000.0
# Every site with a source table in sites/: each has a connector and a consumer lag in the monitor.
SOURCE_SITES = [site.site for site in load_config(Path(__file__).resolve().parents[2]).source_sites()]
ROUTE_A = 'site="site-a",target="central"'


def worker_metrics(
    last_write_ago: float = 30, dead_letters: int = 0, held_identifier: int = 0, held_review: int = 0
) -> str:
    """A worker's /metrics as prometheus-client writes it: site-a wrote 10 Observations, 8 fast and 2 slow."""
    lines = [
        "# TYPE process_start_time_seconds gauge",
        f"process_start_time_seconds {NOW - 3600}",
        "# TYPE cdrsync_last_successful_write_timestamp_seconds gauge",
        f"cdrsync_last_successful_write_timestamp_seconds{{{ROUTE_A}}} {NOW - last_write_ago}",
        "# TYPE cdrsync_end_to_end_latency_seconds histogram",
    ]
    for bound, count in (("0.5", 0), ("1.0", 8), ("5.0", 10), ("+Inf", 10)):
        labels = f'{ROUTE_A},resource_type="Observation",le="{bound}"'
        lines.append(f"cdrsync_end_to_end_latency_seconds_bucket{{{labels}}} {count}")
    lines += [
        f'cdrsync_end_to_end_latency_seconds_count{{{ROUTE_A},resource_type="Observation"}} 10',
        f'cdrsync_end_to_end_latency_seconds_sum{{{ROUTE_A},resource_type="Observation"}} 12',
        "# TYPE cdrsync_writes_total counter",
        f'cdrsync_writes_total{{{ROUTE_A},resource_type="Observation",result="succeeded",error_class=""}} 10',
        f'cdrsync_writes_total{{{ROUTE_A},resource_type="Observation",result="failed",error_class="unavailable"}} 1',
        "# TYPE cdrsync_held_records gauge",
        f'cdrsync_held_records{{site="site-a",reason="missing_identifier"}} {held_identifier}',
        'cdrsync_held_records{site="site-a",reason="reference"} 2',
        f'cdrsync_held_records{{site="site-a",reason="identity_review"}} {held_review}',
        "# TYPE cdrsync_dead_letters_total counter",
        f'cdrsync_dead_letters_total{{stage="normalize",site="site-a",target="",error_class="mapping"}} {dead_letters}',
    ]
    return "\n".join(lines) + "\n"


def monitor_metrics(connector: str = "RUNNING", lag: int = 0, target_up: int = 1) -> str:
    lines = []
    for site in SOURCE_SITES:
        state = connector if site == "site-a" else "RUNNING"
        lines += [
            f'cdrsync_connector_state{{site="{site}",connector="cdrsync-{site}",state="{state}"}} 1',
            f'cdrsync_connector_tasks{{site="{site}",connector="cdrsync-{site}",state="RUNNING"}} 1',
            f'cdrsync_consumer_lag_records{{group="cdrsync",topic="cdc.{site}",kind="source",site="{site}"}} '
            f"{lag if site == 'site-a' else 0}",
            f'cdrsync_replication_slot_retained_wal_bytes{{site="{site}",slot="s"}} 2048',
        ]
    lines += [
        'cdrsync_consumer_lag_records{group="cdrsync",topic="fhir.ready.v1",kind="ready",site=""} 4',
        'cdrsync_topic_records{topic="fhir.sink.dlq",kind="dlq"} 1',
        'cdrsync_topic_records{topic="fhir.conflicts.v1",kind="conflicts"} 0',
        f'cdrsync_target_up{{target="central"}} {target_up}',
    ]
    return "\n".join(lines) + "\n"


def statuses(config: Config, worker: str, monitor: str) -> dict[str, object]:
    views = [WorkerView("http://w", parse_metrics(worker), {"ready": True})]
    result = route_statuses(config, views, parse_metrics(monitor), "cdrsync", now=NOW)
    return {f"{s.site}->{s.target}": s for s in result}


def test_quantiles_interpolate_within_buckets_like_prometheus() -> None:
    buckets = [(0.5, 10.0), (1.0, 20.0), (math.inf, 20.0)]
    assert histogram_quantile(0.5, buckets) == 0.5
    assert histogram_quantile(0.75, buckets) == 0.75
    assert histogram_quantile(0.99, [(1.0, 5.0), (math.inf, 10.0)]) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


def test_a_flowing_route_is_ok_with_its_numbers(config: Config) -> None:
    status = statuses(config, worker_metrics(), monitor_metrics())["site-a->central"]
    assert status.verdict == "OK"  # type: ignore[attr-defined]
    assert status.last_success_age == 30  # type: ignore[attr-defined]
    assert status.latency_p50 == pytest.approx(0.5 + 0.5 * 5 / 8)  # type: ignore[attr-defined]
    assert status.latency_p99 == pytest.approx(1 + 4 * (9.9 - 8) / 2)  # type: ignore[attr-defined]
    assert (status.writes_succeeded, status.writes_failed) == (10, 1)  # type: ignore[attr-defined]
    assert (status.lag, status.held_reference, status.connector) == (0, 2, "cdrsync-site-a RUNNING")  # type: ignore[attr-defined]


def test_a_failed_connector_or_an_unreachable_target_fails_the_route(config: Config) -> None:
    failed = statuses(config, worker_metrics(), monitor_metrics(connector="FAILED"))
    assert failed["site-a->central"].verdict == "FAILING"  # type: ignore[attr-defined]
    assert failed["site-b->central"].verdict == "OK"  # type: ignore[attr-defined]
    down = statuses(config, worker_metrics(), monitor_metrics(target_up=0))
    assert all(s.verdict == "FAILING" for s in down.values())  # type: ignore[attr-defined]


def test_stale_means_changes_wait_and_nothing_was_written_for_15_minutes(config: Config) -> None:
    stale = statuses(config, worker_metrics(last_write_ago=20 * 60), monitor_metrics(lag=5))["site-a->central"]
    assert stale.verdict == "FAILING" and "stale" in stale.failures[0]  # type: ignore[attr-defined]
    quiet = statuses(config, worker_metrics(last_write_ago=20 * 60), monitor_metrics(lag=0))["site-a->central"]
    assert quiet.verdict == "OK"  # type: ignore[attr-defined]
    busy = statuses(config, worker_metrics(last_write_ago=60), monitor_metrics(lag=5))["site-a->central"]
    assert busy.verdict == "OK"  # type: ignore[attr-defined]


def test_dead_letters_and_missing_identifiers_warn(config: Config) -> None:
    status = statuses(config, worker_metrics(dead_letters=2, held_identifier=1), monitor_metrics())["site-a->central"]
    assert status.verdict == "WARNING"  # type: ignore[attr-defined]
    assert status.warnings == ["dead letters", "patients without the shared identifier"]  # type: ignore[attr-defined]


def test_patients_under_identity_review_warn_and_are_counted_apart(config: Config) -> None:
    status = statuses(config, worker_metrics(held_review=3), monitor_metrics())["site-a->central"]
    assert status.verdict == "WARNING"  # type: ignore[attr-defined]
    assert status.warnings == ["patients under identity review (cdrsync identity list)"]  # type: ignore[attr-defined]
    assert (status.held_identifier, status.held_review) == (0, 3)  # type: ignore[attr-defined]


def test_no_worker_answering_fails_every_route(config: Config) -> None:
    views = [WorkerView("http://w", error="not reachable")]
    result = route_statuses(config, views, parse_metrics(monitor_metrics()), "cdrsync", now=NOW)
    assert [s.verdict for s in result] == ["FAILING"] * len(SOURCE_SITES)
    assert "worker http://w: not reachable" in render(result, views, [], "cdrsync")


class _Endpoints(BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, tuple[int, str]]] = {}

    def do_GET(self) -> None:
        status, body = self.pages.get(self.path, (404, "not found"))
        self.send_response(status)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def endpoints() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoints)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_the_command_reads_worker_and_monitor_over_http(endpoints: str, capsys: pytest.CaptureFixture[str]) -> None:
    now = time.time()
    worker = worker_metrics().replace(str(NOW - 30), str(now - 30)).replace(str(NOW - 3600), str(now - 3600))
    _Endpoints.pages = {
        "/metrics": (200, worker),
        "/readyz": (200, '{"ready": true, "checks": {}}'),
        "/monitor": (200, monitor_metrics()),
    }
    assert main(["status", "--worker", endpoints, "--monitor", f"{endpoints}/monitor"]) == 0
    out = capsys.readouterr().out
    assert f"worker {endpoints}: ready" in out
    assert "site-a -> central: OK" in out
    assert re.search(r"last successful write  \d+ s ago", out)
    assert "latency p50 / p99      0.81 s / 4.80 s  (10 written, 1 failed attempts)" in out
    assert "dead-letter topic holds 1 records (cdrsync tap dlq)" in out
    assert "conflicts topic holds 0 records (cdrsync tap conflicts)" in out

    _Endpoints.pages["/monitor"] = (200, monitor_metrics(connector="FAILED"))
    _Endpoints.pages["/readyz"] = (503, '{"ready": false, "checks": {"target_reachable": false}}')
    assert main(["status", "--worker", endpoints, "--monitor", f"{endpoints}/monitor"]) == 1
    out = capsys.readouterr().out
    assert "NOT ready (target_reachable)" in out
    assert "site-a -> central: FAILING" in out and "FAILING: connector cdrsync-site-a FAILED" in out
