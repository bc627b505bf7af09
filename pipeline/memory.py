"""Memory the worker has freed goes back to the operating system (glibc's malloc_trim), every few seconds.

glibc keeps what a process frees for reuse and gives memory back by itself only from the top of its heap.
A worker's heap has short peaks (a back-load fetches thousands of records at once; a batch holds all its
outputs until Kafka acknowledges them), after which most of it is free again but scattered. Measured
during the benchmark's back-load of 60 000 patients: up to 55 MiB of the heap was free, yet resident, and
the worker's RSS kept the highest peak it had seen. Returning it keeps RSS at what is in use, which is
what a memory limit (a container's, say) is set against. A trim takes a few milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["trim_freed_memory"]


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
    return function


_trim = _malloc_trim()


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system; False where that cannot be done."""
    if _trim is None:
        return False
    _trim(0)
    return True
