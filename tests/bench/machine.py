"""What machine and software a run measured: absolute figures only mean something with this beside them."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["describe_machine", "load_average"]

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
