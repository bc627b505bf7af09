"""What machine and software a run measured: absolute figures only mean something with this beside them."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["CpuReading", "cpu_use", "describe_machine", "load_average", "read_cpu"]

REPO = Path(__file__).resolve().parents[2]


def _first(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _run(*command: str) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=REPO)
        return (done.stdout or done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@dataclass(frozen=True)
class CpuReading:
    """CPU time so far, in clock ticks: one process' (user + system), and all cores' busy and total."""

    at: float
    process: int
    machine_busy: int
    machine_total: int


def read_cpu(pid: int) -> CpuReading:
    """A process' CPU time and the machine's, now (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    process = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    cores = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = cores[3] + cores[4]  # idle, iowait
    return CpuReading(time.time(), process, sum(cores) - idle, sum(cores))


def cpu_use(before: CpuReading, after: CpuReading) -> dict[str, float]:
    """Between two readings: seconds passed, the process' CPU seconds and its share of one core, and the share
    of all the machine's cores that were busy (with anything)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = max(1e-9, after.at - before.at)
    process = (after.process - before.process) / ticks
    total = after.machine_total - before.machine_total
    return {
        "seconds": round(seconds, 2),
        "process_cpu_seconds": round(process, 2),
        "process_core_share": round(process / seconds, 3),
        "machine_busy_share": round((after.machine_busy - before.machine_busy) / total, 3) if total else 0.0,
    }


def _kafka_version(lib: Path) -> str:
    jars = sorted(lib.glob("kafka/kafka_2.13-*.jar"))
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"


def _other_java_processes() -> int:
    """JVMs on the machine (another stack's Kafka, Connect, HAPI compete for the same cores)."""
    count = 0
    for status in Path("/proc").glob("[0-9]*/comm"):
        try:
            count += status.read_text().strip() == "java"
        except OSError:
            continue
    return count


def describe_machine(stack_lib: Path, fhir_server: str) -> dict[str, Any]:
    """CPU, cores, memory, kernel, Python, Java, server versions, git commit, date."""
    memory_kib = _first("/proc/meminfo", "MemTotal")
    dirty = _run("git", "status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gib": round(int(memory_kib.split()[0]) / 1024 / 1024, 1) if memory_kib else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "java": _run("java", "-version").splitlines()[0] if _run("java", "-version") else "unknown",
        "fhir_server": fhir_server,
        "kafka": _kafka_version(stack_lib),
        "git_commit": _run("git", "rev-parse", "HEAD") + (" (with uncommitted changes)" if dirty else ""),
        "java_processes_at_start": _other_java_processes(),
    }
