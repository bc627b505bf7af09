"""Observability on the real stack: a live worker's metrics move during a sync, /readyz flips to ready,
`cdrsync monitor` reports the sources, `cdrsync status` reads it all, and the logs are JSON without patient data."""

from __future__ import annotations

import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.cli import main
from pipeline.config import Config
from pipeline.monitor import consumed_topics
from pipeline.status import Sample, fetch_samples, fetch_worker
from tests.casebuilder import observation_for, patient
from tests.integration.conftest import ROOT, SETTINGS, Central, SiteDatabase, Worker, _free_port, central_id, wait_for

pytestmark = pytest.mark.integration
ROUTE = {"site": "site-a", "target": "central"}


def _total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


def test_a_live_worker_reports_a_sync_in_its_metrics_and_logs(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    url = f"http://localhost:{worker.port}"
    assert _get(f"{url}/healthz") == (200, {"alive": True})
    wait_for(lambda: _get(f"{url}/readyz")[0] == 200, timeout=120, what="the worker's /readyz to answer 200")
    before = fetch_worker(url).samples

    prefix = f"{run_id}-obs"
    person = {**patient(prefix), "name": [{"family": f"Obsfamily{run_id}", "given": ["Quintessa"]}]}
    observations = [observation_for(prefix, person["id"], n, 60.0 + n) for n in (1, 2)]
    site_a.upsert_many([person, *observations])
    wait_for(
        lambda: all(
            stack.read(r["resourceType"], central_id(r["resourceType"], r["id"])) for r in [person, *observations]
        ),
        timeout=180,
        what="the patient and its observations at central",
    )

    def moved() -> list[Sample] | None:
        after = fetch_worker(url).samples
        count = "cdrsync_end_to_end_latency_seconds_count"
        grew = _total(after, count, **ROUTE) - _total(before, count, **ROUTE) >= 3
        return after if grew else None

    after = wait_for(moved, timeout=60, what="the latency histogram to count the three writes")
    for resource_type in ("Patient", "Observation"):
        labels = {**ROUTE, "resource_type": resource_type}
        written = "cdrsync_writes_total"
        assert _total(after, written, result="succeeded", **labels) > _total(
            before, written, result="succeeded", **labels
        )
        bucket = {**labels, "le": "+Inf"}
        latency = "cdrsync_end_to_end_latency_seconds_bucket"
        assert _total(after, latency, **bucket) > _total(before, latency, **bucket)
    assert _total(after, "cdrsync_end_to_end_latency_seconds_sum", **ROUTE) > _total(
        before, "cdrsync_end_to_end_latency_seconds_sum", **ROUTE
    )
    last_write = "cdrsync_last_successful_write_timestamp_seconds"
    assert _total(after, last_write, **ROUTE) > _total(before, last_write, **ROUTE)
    normalized = "cdrsync_normalized_total"
    assert _total(after, normalized, site="site-a", outcome="normalized") >= (
        _total(before, normalized, site="site-a", outcome="normalized") + 3
    )
    assert _total(after, "cdrsync_ready") == 1
    # Where its memory is: the tables' RocksDB (memtables charged to the shared cache) and the C heap.
    memory = "cdrsync_worker_memory_bytes"
    assert _total(after, memory, part="memtables") > 0
    assert _total(after, memory, part="block_cache") >= _total(after, memory, part="memtables")
    assert _total(after, memory, part="heap_in_use") > 0
    assert {"heap_free", "heap_mapped", "table_readers", "block_cache_pinned"} <= {
        sample.labels.get("part") for sample in after if sample.name == memory
    }

    # The write of the observation is one JSON line carrying where it came from and where it went.
    target_ref = f"Observation/{central_id('Observation', observations[0]['id'])}"
    entries = [orjson.loads(line) for line in worker.log_path.read_bytes().splitlines() if line.startswith(b"{")]
    written_lines = [e for e in entries if e.get("target_ref") == target_ref and e["msg"].startswith("wrote ")]
    assert written_lines, f"no JSON log line for {target_ref}"
    line = written_lines[-1]
    assert line["site"] == "site-a" and line["target"] == "central" and line["status"] in (200, 201)
    assert line["source_topic"] == "cdc.site-a.fhir.resource" and line["source_offset"] >= 0
    assert line["source_lsn"] > 0
    assert f"Obsfamily{run_id}".encode() not in worker.log_path.read_bytes()
    assert b"Quintessa" not in worker.log_path.read_bytes()


class _Forward(socketserver.BaseRequestHandler):
    """Copies bytes both ways between a client and the real FHIR server."""

    upstream: tuple[str, int]

    def handle(self) -> None:
        with socket.create_connection(self.upstream, timeout=30) as server:
            peers = {self.request: server, server: self.request}
            while True:
                readable, _, _ = select.select(list(peers), [], [], 60)
                if not readable:
                    return
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)


class _Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def fhir_port_forward(config: Config) -> Iterator[tuple[int, threading.Event]]:
    """A port that refuses connections until the event is set, then forwards to the real FHIR server."""
    target = urlsplit(config.target("central").fhir_base_url)
    port = _free_port()
    start = threading.Event()
    servers: list[_Proxy] = []

    def serve() -> None:
        start.wait()
        handler = type("Forward", (_Forward,), {"upstream": (target.hostname, target.port or 80)})
        server = _Proxy(("127.0.0.1", port), handler)
        servers.append(server)
        server.serve_forever()

    threading.Thread(target=serve, daemon=True).start()
    yield port, start
    start.set()
    wait_for(lambda: servers, timeout=10, what="the forwarder to start")
    servers[0].shutdown()


def _commit_end_offsets(config: Config, group: str) -> None:
    """Start a new consumer group at the end of every topic the workers read: it sees only what comes next."""
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    metadata = admin.list_topics(timeout=10).topics
    partitions = [
        TopicPartition(t, p) for t in consumed_topics(config) if t in metadata for p in metadata[t].partitions
    ]
    ends = {
        tp: f.result().offset for tp, f in admin.list_offsets({tp: OffsetSpec.latest() for tp in partitions}).items()
    }
    offsets = [TopicPartition(tp.topic, tp.partition, offset) for tp, offset in ends.items()]
    for future in admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(group, offsets)]).values():
        future.result()


def test_readyz_flips_to_ready_when_the_target_becomes_reachable(
    stack: Central, config: Config, run_id: str, tmp_path: Path, fhir_port_forward: tuple[int, threading.Event]
) -> None:
    port, open_forward = fhir_port_forward
    app_id = f"cdrsync-obs-{run_id}"
    _commit_end_offsets(config, app_id)
    web_port = _free_port()
    target = urlsplit(config.target("central").fhir_base_url)
    env = {
        **os.environ,
        "CDRSYNC_APP_ID": app_id,
        "CDRSYNC_STATE_DIR": str(tmp_path / "state"),
        "CDRSYNC_WEB_PORT": str(web_port),
        "CENTRAL_FHIR_BASE_URL": f"http://127.0.0.1:{port}{target.path}",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
    try:
        readyz = f"http://localhost:{web_port}/readyz"

        def only_the_target_missing() -> dict[str, Any] | None:
            if process.poll() is not None:
                pytest.fail(f"worker exited with {process.returncode}; see {log_path}")
            try:
                status, body = _get(readyz)
            except (urllib.error.URLError, ConnectionError):
                return None
            checks = body.get("checks", {})
            waiting = checks.get("partitions_assigned") and checks.get("tables_recovered")
            return body if status == 503 and waiting and checks.get("target_reachable") is False else None

        body = wait_for(only_the_target_missing, timeout=120, what="/readyz: 503, only the target unreachable")
        assert body["ready"] is False
        assert fetch_worker(f"http://localhost:{web_port}").ready == body

        open_forward.set()
        _, body = wait_for(lambda: (r := _get(readyz))[0] == 200 and r, timeout=60, what="/readyz to answer 200")
        assert body == {
            "ready": True,
            "checks": {"partitions_assigned": True, "tables_recovered": True, "target_reachable": True},
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture
def monitor(stack: Central) -> Iterator[str]:
    """`cdrsync monitor` for the integration tests' consumer group, on a free port."""
    port = _free_port()
    env = {**os.environ, "CDRSYNC_APP_ID": "cdrsync-it"}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "monitor", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://localhost:{port}/metrics"

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"cdrsync monitor exited with {process.returncode}")
        try:
            fetch_samples(url, timeout=30)
        except Exception:
            return False
        return True

    wait_for(answers, timeout=60, what="cdrsync monitor to serve /metrics")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_the_monitor_reports_connectors_slots_lag_and_target(monitor: str, config: Config) -> None:
    samples = fetch_samples(monitor, timeout=30)
    success = {s.labels["collector"]: s.value for s in samples if s.name == "cdrsync_monitor_collect_success"}
    assert success == {"kafka": 1, "connect": 1, "postgres": 1, "target": 1}
    for site in config.source_sites():
        assert site.source is not None
        running = {"site": site.site, "connector": site.source.connector, "state": "RUNNING"}
        assert _total(samples, "cdrsync_connector_state", **running) == 1
        assert _total(samples, "cdrsync_connector_tasks", **running) >= 1
        assert _total(samples, "cdrsync_replication_slot_active", site=site.site) == 1
        assert [
            s
            for s in samples
            if s.name == "cdrsync_replication_slot_retained_wal_bytes" and s.labels["site"] == site.site
        ]
        lag = [s for s in samples if s.name == "cdrsync_consumer_lag_records" and s.labels["site"] == site.site]
        assert [s.labels["group"] for s in lag] == ["cdrsync-it"] and lag[0].value >= 0
    assert _total(samples, "cdrsync_target_up", target="central") == 1
    assert _total(samples, "cdrsync_topic_records", kind="dlq") >= 0
    routes = {(site.site, route.target) for site in config.sites.values() for route in site.routes}
    assert {(s.labels["site"], s.labels["target"]) for s in samples if s.name == "cdrsync_route_info"} == routes
    assert ("site-a", "central") in routes


def test_status_reads_the_live_worker_and_monitor(
    worker: Worker, monitor: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://localhost:{worker.port}"
    wait_for(lambda: _get(f"{url}/readyz")[0] == 200, timeout=120, what="the worker's /readyz to answer 200")
    code = main(["status", "--worker", url, "--monitor", monitor, "--group", "cdrsync-it"])
    out = capsys.readouterr().out
    assert f"worker {url}: ready" in out
    for site in ("site-a", "site-b"):
        assert f"{site} -> central: " in out
        assert f"  connector              cdrsync-{site} RUNNING, 1/1 tasks RUNNING" in out
    assert "FAILING" not in out and code == 0, out
