"""A `cdrsync worker` process of the benchmark: its own consumer group, state directory, topics and target.

Observed only from outside: its process (RSS from /proc), its log (readiness), Kafka and the target.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.status import Sample, fetch_samples, histogram_quantile

__all__ = ["BenchWorker", "memory_parts", "rss_bytes", "stage_buckets", "stage_load", "stage_times", "stop_process"]

REPO = Path(__file__).resolve().parents[2]


def memory_parts(samples: list[Sample]) -> dict[str, int]:
    """part -> bytes from the samples of a worker's /metrics (cdrsync_worker_memory_bytes)."""
    return {s.labels["part"]: int(s.value) for s in samples if s.name == "cdrsync_worker_memory_bytes"}


StageBuckets = dict[tuple[str, str], dict[float, float]]


def stage_buckets(samples: list[Sample]) -> StageBuckets:
    """(stage, part) -> upper bound -> cumulative count, from a worker's cdrsync_stage_seconds."""
    out: StageBuckets = {}
    for s in samples:
        if s.name == "cdrsync_stage_seconds_bucket":
            out.setdefault((s.labels["stage"], s.labels["part"]), {})[float(s.labels["le"])] = s.value  # "+Inf" too
    return out


def stage_times(before: StageBuckets, after: StageBuckets) -> dict[str, dict[str, dict[str, float]]]:
    """stage -> part -> count, p50 and p99 (seconds) of the records a stage took between two readings."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (stage, part), buckets in after.items():
        earlier = before.get((stage, part), {})
        delta = [(bound, count - earlier.get(bound, 0.0)) for bound, count in buckets.items()]
        total = max((count for _, count in delta), default=0.0)
        p50, p99 = histogram_quantile(0.5, delta), histogram_quantile(0.99, delta)
        if total > 0 and p50 is not None and p99 is not None:
            out.setdefault(stage, {})[part] = {"count": total, "p50": p50, "p99": p99}
    return out


def stage_load(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """stage -> records, batches and busy seconds since the worker started (cdrsync_stage_seconds_count of
    `handle`, cdrsync_stage_batches_total, cdrsync_stage_busy_seconds_total)."""
    out: dict[str, dict[str, float]] = {}
    for s in samples:
        stage = s.labels.get("stage")
        if stage is None:
            continue
        if s.name == "cdrsync_stage_seconds_count" and s.labels.get("part") == "handle":
            out.setdefault(stage, {})["records"] = s.value
        elif s.name == "cdrsync_stage_batches_total":
            out.setdefault(stage, {})["batches"] = s.value
        elif s.name == "cdrsync_stage_busy_seconds_total":
            out.setdefault(stage, {})["busy_seconds"] = round(s.value, 3)
    return {stage: load for stage, load in out.items() if load.get("batches")}


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class BenchWorker:
    """One worker process; `started_at` is the wall-clock time it was spawned."""

    def __init__(self, app_id: str, home: Path, env: dict[str, str]) -> None:
        self.app_id = app_id
        self.state_dir = home / "workers" / app_id
        self.log_path = home / "logs" / f"{app_id}.log"
        self.env = env
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> BenchWorker:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            "CDRSYNC_APP_ID": self.app_id,
            "CDRSYNC_STATE_DIR": str(self.state_dir),
            "CDRSYNC_WEB_PORT": str(self.port),
        }
        log = self.log_path.open("ab")
        self.started_at = time.time()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], cwd=REPO, env=env, stdout=log, stderr=log
        )
        return self

    def wait_ready(self, timeout: float = 180) -> float:
        """Block until the worker logged that it is ready; seconds since it was spawned."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker {self.app_id} exited with {self.process.returncode} (log: {self.log_path})")
            if b"Worker ready" in self.log_path.read_bytes():
                return time.time() - self.started_at
            time.sleep(0.2)
        raise TimeoutError(f"worker {self.app_id} not ready after {timeout:.0f}s (log: {self.log_path})")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def memory_parts(self) -> dict[str, int]:
        """The worker's own account of its memory by part; TargetUnavailableError if /metrics does not answer."""
        return memory_parts(self._samples())

    def stage_buckets(self) -> StageBuckets:
        """The worker's cdrsync_stage_seconds buckets now; TargetUnavailableError if /metrics does not answer."""
        return stage_buckets(self._samples())

    def stage_load(self) -> dict[str, dict[str, float]]:
        """Records, batches and busy seconds of each stage so far; TargetUnavailableError if /metrics does not
        answer."""
        return stage_load(self._samples())

    def _samples(self) -> list[Sample]:
        return fetch_samples(f"http://localhost:{self.port}/metrics")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a minute to stop, then SIGKILL; nothing if it has ended."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
