"""Where a worker's memory is, and memory it has freed going back to the operating system.

Freed memory goes back with glibc's malloc_trim, every few seconds.

glibc keeps what a process frees for reuse and gives memory back by itself only from the top of its heap.
A worker's heap has short peaks (a back-load fetches thousands of records at once; a batch holds all its
outputs until Kafka acknowledges them), after which most of it is free again but scattered. Measured
during the benchmark's back-load of 60 000 patients: up to 55 MiB of the heap was free, yet resident, and
the worker's RSS kept the highest peak it had seen. Returning it keeps RSS at what is in use, which is
what a memory limit (a container's, say) is set against. A trim takes a few milliseconds.

What is resident is reported by part (agents/web.py, cdrsync_worker_memory_bytes): the C heap in use and
free (glibc's mallinfo2), and RocksDB's block cache, memtables and table readers, so that growth can be
put down to one of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["heap_usage", "rocksdb_memory", "trim_freed_memory"]


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


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's mallinfo2 (2.33 and later), or None."""
    name = ctypes.util.find_library("c")
    try:
        function = ctypes.CDLL(name).mallinfo2 if name else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = [], _MallInfo2
    return function


_info = _mallinfo2()


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system; False where that cannot be done."""
    if _trim is None:
        return False
    _trim(0)
    return True


def heap_usage() -> dict[str, int]:
    """Bytes of the C heap (every allocation of the process, Python's and RocksDB's included) in use and
    free but still held; empty where the C library cannot tell (not glibc, or glibc before 2.33).

    mallinfo2 covers the main arena and the arenas of other threads; "in_use" counts large blocks glibc
    gave their own mapping too (they go back to the system as soon as they are freed). Python's objects of
    up to 512 bytes live in its own arenas, outside this heap; larger ones (record values, say) are in it.
    """
    if _info is None:
        return {}
    info = _info()
    return {"heap_in_use": info.uordblks + info.hblkhd, "heap_free": info.fordblks}


class _Cache(Protocol):
    def get_usage(self) -> int: ...
    def get_pinned_usage(self) -> int: ...


class _Db(Protocol):
    def property_int_value(self, name: str) -> Any: ...


_DB_PROPERTIES = {
    "memtables": "rocksdb.size-all-mem-tables",  # active and immutable, not yet flushed
    "table_readers": "rocksdb.estimate-table-readers-mem",  # index and filters outside the block cache
}


def rocksdb_memory(dbs: Iterable[_Db], cache: _Cache | None) -> dict[str, int]:
    """Bytes RocksDB holds for these databases: their memtables and table readers summed, and the shared
    block cache's usage (memtables charged to it by a write buffer manager count there too)."""
    totals = dict.fromkeys(_DB_PROPERTIES, 0)
    for db in dbs:
        for part, name in _DB_PROPERTIES.items():
            totals[part] += int(db.property_int_value(name) or 0)
    if cache is not None:
        totals["block_cache"] = int(cache.get_usage())
        totals["block_cache_pinned"] = int(cache.get_pinned_usage())
    return totals
