"""A CPU profile of a running worker with py-spy (sampling from outside: nothing in the worker changes).

py-spy reads the process' memory with ptrace (root, or CAP_SYS_PTRACE). It samples without pausing the
worker (--nonblocking), so the profile costs the worker nothing but a share of the machine's CPU.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "parse_collapsed", "top_functions"]


def parse_collapsed(text: str) -> tuple[Counter[str], Counter[str], int]:
    """py-spy's raw (collapsed) stacks → samples per function as the innermost frame (own), per function
    anywhere on the stack (total, once per stack), and the number of samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return own, total, samples


def top_functions(counts: Counter[str], samples: int, n: int = 10) -> list[dict[str, Any]]:
    """The n functions with most samples, with their share of all samples in percent."""
    return [
        {"function": frame, "samples": count, "percent": round(100.0 * count / samples, 1) if samples else 0.0}
        for frame, count in counts.most_common(n)
    ]


class Profiler:
    """`py-spy record` of one process until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.process: subprocess.Popen[bytes] | None = None
        self.error: str | None = None

    def start(self) -> Profiler:
        executable = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        command = [executable, "record", "--pid", str(self.pid), "--format", "raw", "--output", str(self.out)]
        command += ["--rate", str(self.rate), "--nonblocking", "--function"]
        try:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            self.error = f"py-spy could not start: {exc}"
        return self

    def stop(self) -> dict[str, Any]:
        """Stop sampling; the top ten functions by own and by total samples."""
        if self.process is None:
            return {"error": self.error or "py-spy did not run"}
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        try:
            _, stderr = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return {"error": "py-spy did not stop"}
        if not self.out.exists():
            return {"error": f"py-spy wrote no profile: {stderr.decode(errors='replace')[-300:]}"}
        own, total, samples = parse_collapsed(self.out.read_text(errors="replace"))
        return {
            "tool": "py-spy record --nonblocking --function",
            "rate_hz": self.rate,
            "samples": samples,
            "raw": str(self.out),
            "top_own": top_functions(own, samples),
            "top_total": top_functions(total, samples),
        }
