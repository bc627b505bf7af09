"""The fault-injection suite: real stack, real faults, and a reconciliation after each scenario.

Run it alone (`make faults`, or `pytest -m faults`): its workers must be the only ones consuming,
or another worker would quietly write what a killed one lost and hide the loss.
Each scenario prints one line of figures (sent, written, dead-lettered, duplicates, lost, inverted).
`CDRSYNC_SOAK=1` makes the scenarios longer (more data, more faults).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import load_config
from pipeline.references import logical_system
from pipeline.tap import tap
from tests.casebuilder import observation_for, patient
from tests.faults.proxy import FaultProxy
from tests.integration import conftest as integration
from tests.integration.conftest import ROOT, SETTINGS, Central, SiteDatabase, Worker, central_id, wait_for

# The real-stack fixtures of the integration tests, shared (a fixture is found by its name in a conftest).
stack, run_id, site_a, site_b = integration.stack, integration.run_id, integration.site_a, integration.site_b
__all__ = ["SETTINGS", "Central", "SiteDatabase", "Worker", "central_id", "wait_for"]

SOAK = os.environ.get("CDRSYNC_SOAK", "") not in ("", "0")
GROUP = "cdrsync-faults"  # one consumer group across runs: a rerun resumes instead of replaying history
TOPIC_PREFIX = "faults."


def cdrsync(*args: str) -> str:
    """Run a `cdrsync` command as ops would (with the suite's topic prefix); its output, or fail with its errors."""
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"cdrsync {' '.join(args)} failed: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="session", autouse=True)
def fault_topics() -> Iterator[None]:
    """The suite's own pipeline topics, and its consumer groups at the end of every topic.

    With CDRSYNC_TOPIC_PREFIX (source topics are shared), the records other workers left in
    fhir.ready.v1 & co. are not replayed here, and nothing of this suite reaches other workers' topics;
    the workers and `cdrsync` commands started by the suite inherit it. The scenarios reconcile only
    their own changes, so what other tests left in the source topics is skipped too. No worker runs yet.
    """
    previous = os.environ.get("CDRSYNC_TOPIC_PREFIX")
    os.environ["CDRSYNC_TOPIC_PREFIX"] = TOPIC_PREFIX
    config = load_config(ROOT)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "topics", "apply"], cwd=ROOT, check=True, timeout=120)
    topics = [config.source_topic(site) for site in [*config.source_sites(), *config.capture_sites()]]
    topics += [config.topics.name(key) for key in config.topics.topics]
    integration.start_at_end(GROUP, topics)
    integration.start_at_end(f"{GROUP}-retry", [tier.name for tier in config.topics.retry_tiers])
    yield
    if previous is None:
        os.environ.pop("CDRSYNC_TOPIC_PREFIX", None)
    else:
        os.environ["CDRSYNC_TOPIC_PREFIX"] = previous


@pytest.fixture
def fault_worker(stack: Central, tmp_path: Path) -> Iterator[Worker]:
    """A worker of the fault suite's own group and state directory (not started yet)."""
    process = Worker(GROUP, tmp_path / "state", tmp_path / "worker.log")
    yield process
    process.stop()
    print(f"\nworker log: {process.log_path}")


@pytest.fixture
def proxy(stack: Central) -> Iterator[FaultProxy]:
    """A fault proxy in front of the central FHIR server."""
    proxy = FaultProxy(stack.base_url)
    yield proxy
    proxy.close()


@contextmanager
def started_worker(tmp_path: Path, **env: str) -> Iterator[Worker]:
    """A started worker of the suite's group with these environment variables, stopped at the end."""
    worker = Worker(GROUP, tmp_path / "state", tmp_path / "worker.log", env=env)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
        print(f"\nworker log: {worker.log_path}")


@contextmanager
def worker_behind(proxy: FaultProxy, tmp_path: Path, **env: str) -> Iterator[Worker]:
    """A started worker of the suite's group that reaches the central server through the proxy."""
    with started_worker(tmp_path, CENTRAL_FHIR_BASE_URL=proxy.base_url, **env) as worker:
        yield worker


def config_root_with(dest: Path, site: str, old: str, new: str) -> Path:
    """The shipped configuration under dest (a CDRSYNC_CONFIG_ROOT of a test's own), with one site file's line
    `old` replaced by `new` (e.g. its write-back going elsewhere)."""
    shutil.copy(ROOT / "topics.yaml", dest / "topics.yaml")
    shutil.copytree(ROOT / "sites", dest / "sites")
    shutil.copytree(ROOT / "connectors", dest / "connectors")
    path = dest / "sites" / f"{site}.yaml"
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{site}.yaml no longer holds {old!r}"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return dest


@contextmanager
def worker_with_config(root: Path, tmp_path: Path, **env: str) -> Iterator[Worker]:
    """A started worker of the suite's group reading the configuration under root."""
    with started_worker(tmp_path, CDRSYNC_CONFIG_ROOT=str(root), **env) as worker:
        yield worker


def decision_row(site: SiteDatabase, row_id: str) -> dict[str, Any] | None:
    """A decision written back into a hospital's table, or None."""
    with site.conn.cursor() as cursor:
        cursor.execute(
            "SELECT content FROM fhir.resource WHERE resource_type = 'QuestionnaireResponse' AND id = %s", (row_id,)
        )
        row = cursor.fetchone()
    return row[0] if row else None


@dataclass
class Workload:
    """Source changes of one scenario: patients with observations, then updates that raise each value.

    Every update raises an Observation's value, so the target's version history of a resource must
    show non-decreasing values: a lower value after a higher one is an inverted order.
    """

    prefix: str
    patients: int
    observations: int = 4
    updates: int = 2
    seed: int = 7
    changes: int = 0
    latest: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def patient_batches(self, n: int) -> list[list[dict[str, Any]]]:
        """Patient n's transactions: its insert (an Observation before the Patient), then its updates."""
        rng = random.Random(self.seed * 100_003 + n)
        person = patient(self.prefix, n)
        obs = [observation_for(f"{self.prefix}-{n}", person["id"], k, float(10 * k)) for k in range(self.observations)]
        batches = [[*obs[:1], person, *obs[1:]]]
        for round_ in range(1, self.updates + 1):
            changed = [
                {**o, "valueQuantity": {**o["valueQuantity"], "value": float(10 * k + round_)}}
                for k, o in enumerate(obs)
                if rng.random() < 0.5
            ]
            if changed:
                batches.append(changed)
        return batches

    def transactions(self, first: int = 0, count: int | None = None) -> list[list[dict[str, Any]]]:
        """Inserts of patients first..first+count, then their updates."""
        numbers = range(first, self.patients if count is None else first + count)
        plans = [self.patient_batches(n) for n in numbers]
        return [plan[0] for plan in plans] + [batch for plan in plans for batch in plan[1:]]

    def load(self, db: SiteDatabase, batches: list[list[dict[str, Any]]], pause: float = 0.0) -> None:
        for batch in batches:
            db.upsert_many(batch)
            self.changes += len(batch)
            for resource in batch:
                self.latest[(resource["resourceType"], resource["id"])] = resource
            if pause:
                time.sleep(pause)


def load_in_background(workload: Workload, db: SiteDatabase, pause: float) -> threading.Thread:
    batches = workload.transactions()
    thread = threading.Thread(target=workload.load, args=(db, batches, pause), daemon=True)
    thread.start()
    return thread


@dataclass
class Reconciliation:
    sent: int
    resources: int
    written: int
    dead_lettered: int
    duplicates: int
    lost: list[str]
    wrong_content: list[str]
    inverted: list[str]
    conflicts: list[str] = field(default_factory=list)

    def line(self, scenario: str) -> str:
        return (
            f"RECONCILIATION {scenario}: changes sent {self.sent}, resources {self.resources}, "
            f"written {self.written}, dead-lettered {self.dead_lettered}, duplicates {self.duplicates}, "
            f"lost {len(self.lost)}, wrong content {len(self.wrong_content)}, inverted order {len(self.inverted)}, "
            f"conflicts {len(self.conflicts)}"
        )


def _expected_matches(resource: dict[str, Any], body: dict[str, Any]) -> bool:
    if resource["resourceType"] == "Observation":
        return body.get("valueQuantity", {}).get("value") == resource["valueQuantity"]["value"]
    return body.get("identifier", [None])[0] == resource["identifier"][0]


def _history_values(central: Central, resource_type: str, resource_id: str) -> list[float]:
    versions = [r for r in central.history(resource_type, resource_id) if r is not None]
    return [r["valueQuantity"]["value"] for r in versions if "valueQuantity" in r]


def reconcile(central: Central, workload: Workload, dead_refs: set[str], site: str = "site-a") -> Reconciliation:
    """Every source change at the target exactly once with its latest content, or dead-lettered."""
    written = dead = duplicates = 0
    lost, wrong, inverted = [], [], []
    for (resource_type, source_id), resource in workload.latest.items():
        target = central_id(resource_type, source_id, site)
        ref = f"{resource_type}/{target}"
        body = central.read(resource_type, target)
        if body is None:
            if ref in dead_refs:
                dead += 1
            else:
                lost.append(ref)
            continue
        written += 1
        system = "urn:example:mrn" if resource_type == "Patient" else logical_system(site, resource_type)
        value = resource["identifier"][0]["value"] if resource_type == "Patient" else source_id
        copies = central.count_by_identifier(resource_type, system, value)
        duplicates += max(0, copies - 1)
        if not _expected_matches(resource, body):
            wrong.append(ref)
        if resource_type == "Observation":
            values = _history_values(central, resource_type, target)
            if values != sorted(values):
                inverted.append(f"{ref}: {values}")
    refs = {f"{t}/{central_id(t, source_id, site)}" for t, source_id in workload.latest}
    conflicts = sorted(ref for ref in _conflict_refs() if ref in refs)  # nobody edits central here: none is real
    return Reconciliation(
        workload.changes, len(workload.latest), written, dead, duplicates, lost, wrong, inverted, conflicts
    )


def _conflict_refs() -> set[str]:
    """Target references in the suite's conflicts topic."""
    topic = load_config(ROOT).topics.name("conflicts")
    items = tap(SETTINGS.kafka_bootstrap, topic, idle_seconds=2)
    return {str(i["value"].get("target_ref")) for i in items if isinstance(i["value"], dict)}


def settle(central: Central, workload: Workload, timeout: float) -> None:
    """Wait until the target holds the latest content of every resource of the workload; a timeout names the
    resources missing or stale at the target (by source id)."""

    def at_target(resource_type: str, source_id: str, resource: dict[str, Any]) -> str | None:
        body = central.read(resource_type, central_id(resource_type, source_id))
        return "missing" if body is None else None if _expected_matches(resource, body) else "stale"

    def done() -> bool:
        return all(at_target(t, i, r) is None for (t, i), r in workload.latest.items())

    try:
        wait_for(done, timeout=timeout, what=f"{len(workload.latest)} resources with their latest content", interval=3)
    except pytest.fail.Exception:
        behind = [f"{state} {t}/{i}" for (t, i), r in workload.latest.items() if (state := at_target(t, i, r))]
        pytest.fail(f"after {timeout:.0f}s, {len(behind)} resource(s) not at the target as last changed: {behind[:20]}")


def assert_clean(result: Reconciliation, scenario: str) -> None:
    print("\n" + result.line(scenario))
    assert result.lost == [], f"lost at the target and not dead-lettered: {result.lost[:10]}"
    assert result.duplicates == 0
    assert result.wrong_content == [], f"not the latest source content: {result.wrong_content[:10]}"
    assert result.inverted == [], f"version order inverted: {result.inverted[:10]}"
    assert result.conflicts == [], f"reported as conflicts though nobody edited them: {result.conflicts[:10]}"
