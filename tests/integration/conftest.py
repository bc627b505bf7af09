"""The real stack (make up): PostgreSQL, Kafka, Kafka Connect + Debezium, HAPI FHIR, and a worker.

These tests fail, never skip, when a service is missing. Every test uses ids with its own run
prefix, so tests need no reset and can run against a stack that already holds data.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.config import Config
from pipeline.demo import site_dsn
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.references import logical_system
from pipeline.settings import Settings
from tests.casebuilder import KVNR_SYSTEM, encounter_for, kvnr_of, tumorboard_flag, with_kvnr

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings()


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll until check() returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"gave up after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Central:
    """The central FHIR server, read with plain HTTP."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")

    def get(self, path: str) -> tuple[int, dict[str, Any] | None]:
        request = urllib.request.Request(f"{self.base_url}/{path}", headers={"Accept": "application/fhir+json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, None

    def send(self, resource: dict[str, Any], method: str = "POST") -> dict[str, Any]:
        """Create a resource (POST: the server assigns its id) or update it (PUT at its id), the way the
        tumour-board application does; the resource as the server stored it."""
        at = f"/{resource['id']}" if method == "PUT" else ""
        request = urllib.request.Request(
            f"{self.base_url}/{resource['resourceType']}{at}",
            data=orjson.dumps(resource),
            method=method,
            headers={"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            stored: dict[str, Any] = orjson.loads(response.read())
            return stored

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        status, body = self.get(f"{resource_type}/{resource_id}")
        return body if status == 200 else None

    def history(self, resource_type: str, resource_id: str) -> list[dict[str, Any] | None]:
        """Every version the server holds, oldest first: the resource, or None for a deletion."""
        status, bundle = self.get(f"{resource_type}/{resource_id}/_history?_count=100")
        assert status == 200, f"_history of {resource_type}/{resource_id} answered {status}"
        entries = sorted(
            (bundle or {}).get("entry", []), key=lambda e: int(e["response"]["etag"].removeprefix("W/").strip('"'))
        )
        return [entry.get("resource") for entry in entries]

    def count_by_identifier(self, resource_type: str, system: str, value: str) -> int:
        status, body = self.get(f"{resource_type}?identifier={system}|{value}&_summary=count")
        assert status == 200, f"search failed with {status}"
        return int((body or {}).get("total", 0))


@dataclass(frozen=True)
class SharedPatient:
    """One person at site-a and site-b (patient_at_both_hospitals)."""

    key: str  # the central Patient's id
    at_a: dict[str, Any]
    at_b: dict[str, Any]
    encounter_b: dict[str, Any]  # the encounter of site-b's tumour-board Flag


def patient_at_both_hospitals(
    stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, kvnr: str, prefix: str
) -> SharedPatient:
    """A person site-a sends, then site-b (on a tumour-board Flag, its route's trigger), under one shared number:
    once it returns, the central Patient holds both hospitals' local ids, so central's decisions flow back to both."""
    key = global_patient_key(KVNR_SYSTEM, kvnr)
    at_a = with_kvnr({"resourceType": "Patient", "id": f"{prefix}-a", "gender": "female"}, kvnr)
    at_b = with_kvnr({"resourceType": "Patient", "id": f"{prefix}-b", "gender": "female"}, kvnr)
    encounter_b = encounter_for(prefix, at_b["id"])
    site_a.upsert(at_a)
    wait_for(lambda: stack.read("Patient", key), timeout=120, what="site-a's patient at central")
    site_b.upsert_many([at_b, encounter_b, tumorboard_flag(f"{prefix}-tb", at_b["id"], encounter_b["id"])])
    both = {logical_system("site-a", "Patient"), logical_system("site-b", "Patient")}

    def known_to_both() -> bool:
        return both <= {i.get("system") for i in (stack.read("Patient", key) or {}).get("identifier", [])}

    wait_for(known_to_both, timeout=120, what="both hospitals' local ids on the central patient")
    return SharedPatient(key, at_a, at_b, encounter_b)


class SiteDatabase:
    """A site's fhir.resource table, written the way a hospital CDR would."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)

    def upsert(self, resource: dict[str, Any]) -> None:
        self.upsert_many([resource])

    def upsert_many(self, resources: list[dict[str, Any]]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            for resource in resources:
                cur.execute(
                    "INSERT INTO fhir.resource (resource_type, id, version, content) VALUES (%s, %s, 1, %s) "
                    "ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
                    "version = fhir.resource.version + 1, updated_at = now()",
                    (resource["resourceType"], resource["id"], orjson.dumps(resource).decode()),
                )

    def delete(self, resource_type: str, resource_id: str) -> None:
        with self.conn.cursor() as cur:
            cur.execute("DELETE FROM fhir.resource WHERE resource_type = %s AND id = %s", (resource_type, resource_id))


class Worker:
    """A `cdrsync worker` process with its own consumer group and state directory.

    Supervised, as a service manager would run it: when it exits on its own (it does so on purpose
    rather than acknowledge what it could not pass on), it is started again; `restarts` counts that.
    kill() and stop() are not restarted.
    """

    def __init__(self, app_id: str, state_dir: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.app_id, self.state_dir, self.log_path = app_id, state_dir, log_path
        self.env = env or {}
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._lock = threading.RLock()
        self._expected_exit = False
        self._log_mark = 0
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        with self._lock:
            self._expected_exit = False
            self.spawn()
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, daemon=True)
            self._supervisor.start()
        wait_for(self._ready, timeout=180, what=f"worker {self.app_id} to report ready (log: {self.log_path})")

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        env = {
            **os.environ,
            "CDRSYNC_APP_ID": self.app_id,
            "CDRSYNC_STATE_DIR": str(self.state_dir),
            "CDRSYNC_WEB_PORT": str(self.port),
            "CDRSYNC_GROUP_INSTANCE_ID": f"{self.app_id}@{self.port}",  # as compose/native/worker.sh names it
            **self.env,
        }
        self._log_mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], cwd=ROOT, env=env, stdout=log, stderr=log
        )

    def _supervise(self) -> None:
        while True:
            time.sleep(0.5)
            with self._lock:
                process = self.process
                if self._expected_exit or process is None or process.poll() is None:
                    continue
                self.restarts += 1
                with self.log_path.open("ab") as log:
                    log.write(f"\n----- exited with {process.returncode}; restarting -----\n".encode())
                time.sleep(2)
                self.spawn()

    def _ready(self) -> bool:
        with self.log_path.open("rb") as log:
            log.seek(self._log_mark)
            return b"Worker ready" in log.read()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples on the worker's /metrics whose labels include the given ones (0 for none).

        A worker being restarted by its supervisor does not answer for a moment: that is waited for.
        """
        return sum(self.samples(name, **labels))

    def samples(self, name: str, **labels: str) -> list[float]:
        """A metric's samples on the worker's /metrics whose labels include the given ones."""
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://localhost:{self.port}/metrics", timeout=10) as response:
                    text = response.read().decode()
                break
            except urllib.error.URLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        found = []
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            series, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in series for k, v in labels.items()):
                found.append(float(value))
        return found

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, no final commit (and no restart)."""
        with self._lock:
            self._expected_exit = True
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
            with self.log_path.open("ab") as log:
                log.write(b"\n----- SIGKILL -----\n")

    def stop(self) -> None:
        with self._lock:
            self._expected_exit = True
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _connector_problem(name: str) -> str | None:
    """None when the connector and its task run, else what is wrong."""
    try:
        with urllib.request.urlopen(f"{SETTINGS.connect_url}/connectors/{name}/status", timeout=10) as response:
            status = orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return f"connector {name}: Kafka Connect answered {exc.code}"
    except urllib.error.URLError as exc:
        return f"Kafka Connect not reachable for {name}: {exc}"
    states = [status["connector"]["state"], *(task["state"] for task in status.get("tasks", []))]
    if len(states) < 2 or any(state != "RUNNING" for state in states):
        return f"connector {name} is not running: {states}"
    return None


@pytest.fixture(scope="session")
def stack(config: Config) -> Central:
    """Check every service; fail (not skip) with the one that is missing."""
    problems = []
    try:
        AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap}).list_topics(timeout=10)
    except Exception as exc:
        problems.append(f"Kafka at {SETTINGS.kafka_bootstrap}: {exc}")
    for site in config.source_sites():
        dsn = site_dsn(site, SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value)
        try:
            psycopg.connect(dsn, connect_timeout=5).close()
        except psycopg.Error as exc:
            problems.append(f"PostgreSQL for {site.site}: {exc}")
        problem = _connector_problem(site.source.connector)  # a just-registered connector needs a moment
        for _ in range(60):
            if problem is None or "not reachable" in problem:
                break
            time.sleep(1)
            problem = _connector_problem(site.source.connector)
        if problem is not None:
            problems.append(problem)
    central = Central(config.target("central").fhir_base_url)
    try:
        if central.get("metadata")[0] != 200:
            problems.append("FHIR server metadata did not answer 200")
    except urllib.error.URLError as exc:
        problems.append(f"FHIR server at {central.base_url}: {exc}")
    if problems:
        pytest.fail("the stack is not running (start it with `make up`):\n  " + "\n  ".join(problems))
    return central


def _high_watermark(consumer: Consumer, tp: TopicPartition) -> int:
    """A partition's high watermark; a topic `topics apply` just created has no leader for a moment."""
    deadline = time.monotonic() + 60
    while True:
        try:
            _, high = consumer.get_watermark_offsets(tp, timeout=15)
            return int(high)
        except KafkaException as error:
            if error.args[0].code() != KafkaError.NOT_LEADER_FOR_PARTITION or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _commit_when_the_group_is_empty(consumer: Consumer, offsets: list[TopicPartition], group: str) -> None:
    """Workers are static members (CDRSYNC_GROUP_INSTANCE_ID): one stopped by a run just before stays in the
    group for its session (30 s), and the broker takes no commit from outside a group with members."""
    deadline = time.monotonic() + 90
    while True:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
            return
        except KafkaException as error:
            waiting = error.args[0].code() in (KafkaError.UNKNOWN_MEMBER_ID, KafkaError.REBALANCE_IN_PROGRESS)
            if not waiting or time.monotonic() > deadline:
                raise
            print(f"group {group} still has members of an earlier run; waiting for them to time out")
            time.sleep(3)


def start_at_end(group: str, topics: list[str]) -> None:
    """Commit `group` at the end of every partition of `topics`, so that its workers, started next, read only
    what comes after: other suites (the fault suite, the demo) write to the same source topics on a shared stack."""
    consumer = Consumer({"bootstrap.servers": SETTINGS.kafka_bootstrap, "group.id": group})
    try:
        ends = []
        for name in topics:
            metadata = consumer.list_topics(name, timeout=15).topics[name]
            for partition in metadata.partitions:
                high = _high_watermark(consumer, TopicPartition(name, partition))
                ends.append(TopicPartition(name, partition, high))
        _commit_when_the_group_is_empty(consumer, ends, group)
    finally:
        consumer.close()


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def worker(stack: Central, config: Config, run_id: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    base = tmp_path_factory.mktemp("worker")
    # One consumer group across runs: a rerun against a kept stack resumes instead of replaying history.
    # A wider sink batch window than the default 5 ms: records a test sends together are then one batch; and
    # transaction bundles, which are off by default (test_sink_bundles). The fault suite and the demo run with
    # the defaults, so both ways of writing are tested against the real server.
    env = {"CDRSYNC_SINK_BATCH_SECONDS": "0.2", "CDRSYNC_SINK_BUNDLE_MAX": "50"}
    # The hospitals' changes from before it (another suite's, the demo's) are not this suite's: its tests make
    # their own once it runs. Read, they would be written to central too, and a record of another suite's that
    # waits for something only that suite writes would hold this worker's sink.
    start_at_end("cdrsync-it", [config.source_topic(s) for s in [*config.source_sites(), *config.capture_sites()]])
    process = Worker("cdrsync-it", base / "state", base / "worker.log", env=env)
    process.start()
    yield process
    process.stop()


@pytest.fixture
def site_a(config: Config) -> Iterator[SiteDatabase]:
    site = config.sites["site-a"]
    db = SiteDatabase(site_dsn(site, SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value))
    yield db
    db.conn.close()


@pytest.fixture
def site_b(config: Config) -> Iterator[SiteDatabase]:
    site = config.sites["site-b"]
    db = SiteDatabase(site_dsn(site, SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value))
    yield db
    db.conn.close()


def audit_rows(source_id: str) -> list[tuple[str, str | None, str | None]]:
    """(step, target id, content hash) of every audit.event row of a source id, oldest first."""
    dsn = f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} user={SETTINGS.pg_user} dbname={SETTINGS.audit_database}"
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_regclass('audit.event') IS NOT NULL",
        )
        if not cursor.fetchone()[0]:
            return []
        cursor.execute(
            "SELECT step, target_id, content_hash FROM audit.event WHERE source_id = %s ORDER BY at", (source_id,)
        )
        return list(cursor.fetchall())


def central_id(resource_type: str, source_id: str, site: str = "site-a") -> str:
    """The id a site resource gets at the central CDR (test patients carry kvnr_of(id) as shared identifier)."""
    if resource_type == "Patient":
        return global_patient_key(KVNR_SYSTEM, kvnr_of(source_id))
    return target_id(site, resource_type, source_id)
