"""Kafka and Kafka Connect die (kill -9) and come back while a hospital keeps writing.

The worker runs under a supervisor, as in production (systemd, Kubernetes): when Kafka cannot take a
record the worker exits on purpose rather than acknowledge it, and is started again. Debezium sends
again what followed its last flushed offset after Connect dies: the target gets no duplicate and no
old content over new.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import (
    SOAK,
    Central,
    SiteDatabase,
    Worker,
    Workload,
    assert_clean,
    reconcile,
    settle,
    wait_for,
)
from tests.integration.conftest import ROOT, _connector_problem

pytestmark = pytest.mark.faults
STACK_RUN = Path(os.environ.get("CDRSYNC_HOME", ROOT / ".stack")) / "run"


class Supervisor(threading.Thread):
    """Start the worker again whenever it exits, like a service manager."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(daemon=True)
        self.worker, self.restarts, self.stopping = worker, 0, threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            process = self.worker.process
            if process is not None and process.poll() is not None:
                self.restarts += 1
                self.worker.log_path.open("ab").write(
                    f"\n----- exited {process.returncode}, restarting -----\n".encode()
                )
                time.sleep(2)
                self.worker.spawn()
            time.sleep(0.5)


@pytest.fixture
def supervised(fault_worker: Worker) -> Iterator[Supervisor]:
    fault_worker.start()
    supervisor = Supervisor(fault_worker)
    supervisor.start()
    yield supervisor
    supervisor.stopping.set()
    supervisor.join()


def _kill9(service: str) -> None:
    pid = int((STACK_RUN / f"{service}.pid").read_text().strip())
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), timeout=30, what=f"{service} (pid {pid}) to die")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start(service: str) -> None:
    subprocess.run(["bash", str(ROOT / "compose" / "native" / f"{service}.sh"), "start"], check=True, cwd=ROOT)


def test_kafka_and_connect_killed_and_restarted(
    supervised: Supervisor, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    workload = Workload(f"{run_id}-i", patients=60 if SOAK else 30)
    half = workload.patients // 2
    rounds = 3 if SOAK else 1
    for round_ in range(rounds):
        first = round_ * half // rounds
        loader = threading.Thread(
            target=workload.load, args=(site_a, workload.transactions(first, half // rounds), 0.1), daemon=True
        )
        loader.start()
        time.sleep(3)
        print("\nkill -9 kafka")
        _kill9("kafka")
        time.sleep(10)
        _start("kafka")
        loader.join()

    for round_ in range(rounds):
        first = half + round_ * (workload.patients - half) // rounds
        count = (workload.patients - half) // rounds
        loader = threading.Thread(
            target=workload.load, args=(site_a, workload.transactions(first, count), 0.1), daemon=True
        )
        loader.start()
        time.sleep(2)
        print("\nkill -9 connect")
        _kill9("connect")
        time.sleep(5)
        _start("connect")
        loader.join()

    wait_for(lambda: _connector_problem("cdrsync-site-a") is None, timeout=180, what="the site-a connector to run")
    settle(stack, workload, timeout=600)
    print(f"\nworker restarts by the supervisor: {supervised.restarts}")
    assert_clean(reconcile(stack, workload, dead_refs=set()), "kafka and connect kill -9")
