"""Where a worker's memory is, and memory it has freed going back to the operating system.

Freed memory goes back with glibc's malloc_trim, every few seconds.

glibc keeps what a process frees for reuse and gives memory back by itself only from the top of its heap.
A worker's heap has short peaks (a back-load fetches thousands of records at once; a batch holds all its
outputs until Kafka acknowledges them), after which most of it is free again but scattered. Measured
during the benchmark's back-load of 60 000 patients: up to 55 MiB of the heap was free, yet resident, and
the worker's RSS kept the highest peak it had seen. Returning it keeps RSS at what is in use, which is
what a memory limit (a container's, say) is set against. A trim takes a few milliseconds.

Large allocations get a mapping of their own, so that they go back as soon as they are freed instead of
leaving the heap full of holes (map_large_allocations).

What is resident is reported by part (agents/web.py, cdrsync_worker_memory_bytes): the C heap in use,
mapped and free (glibc's mallinfo2), and RocksDB's block cache, memtables and table readers, so that growth can be
put down to one of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from rocksdict import DbClosedError

__all__ = ["heap_usage", "map_large_allocations", "rocksdb_memory", "trim_freed_memory"]


def _libc(name: str, argtypes: list[Any], restype: Any) -> Any:
    """A function of the C library, typed; None where the C library has none (musl, macOS, an older glibc)."""
    library = ctypes.util.find_library("c")
    try:
        function = getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None
    if function is not None:
        function.argtypes, function.restype = argtypes, restype
    return function


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_M_MMAP_THRESHOLD = -3  # malloc.h
_trim: Callable[[int], int] | None = _libc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
_set_option: Callable[[int, int], int] | None = _libc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
_info: Callable[[], _MallInfo2] | None = _libc("mallinfo2", [], _MallInfo2)  # glibc 2.33 and later


def trim_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system; False where that cannot be done."""
    if _trim is None:
        return False
    _trim(0)
    return True


def map_large_allocations(threshold: int) -> bool:
    """Allocations of `threshold` bytes or more get a mapping of their own, which goes back to the operating
    system the moment they are freed; False where that cannot be set (not glibc).

    glibc starts with 128 KiB but raises the threshold to the size of every mapped block freed, up to
    32 MiB: after the first fetched batch of records is freed, batches of that size come from the heap and,
    freed, leave it full of holes that the trim cannot return while a few small live allocations remain in
    each page. Measured with the memory benchmark (100 000 patients after 10 000): with glibc's own
    threshold the worker's heap held up to 73 MiB free, and RSS grew by 13 to 25 % to 204-206 MiB (five
    runs); fixed at 128 KiB, by 2 to 6 % to 169 MiB (three runs). Setting it turns glibc's raising off.
    """
    if _set_option is None:
        return False
    return bool(_set_option(_M_MMAP_THRESHOLD, threshold))


def heap_usage() -> dict[str, int]:
    """Bytes of the C heap (every allocation of the process, Python's and RocksDB's included): in use in
    the heap, in use in blocks with a mapping of their own (map_large_allocations), and free but still held
    (some of it already returned by a trim); empty where the C library cannot tell (not glibc, or before 2.33).

    mallinfo2 covers the main arena and the arenas of other threads. Python's objects of up to 512 bytes
    live in its own arenas, outside this heap; larger ones (record values, say) are in it.
    """
    if _info is None:
        return {}
    info = _info()
    return {"heap_in_use": info.uordblks, "heap_mapped": info.hblkhd, "heap_free": info.fordblks}


class _Cache(Protocol):
    def get_usage(self) -> int: ...
    def get_pinned_usage(self) -> int: ...


class _Db(Protocol):
    def property_int_value(self, name: str) -> Any: ...


_DB_PROPERTIES = {
    "memtables": "rocksdb.size-all-mem-tables",  # active and immutable, not yet flushed
    "table_readers": "rocksdb.estimate-table-readers-mem",  # index and filters outside the block cache
}


def rocksdb_memory(dbs: Iterable[_Db], cache: _Cache) -> dict[str, int]:
    """Bytes RocksDB holds for these databases: their memtables and table readers summed, and the shared
    block cache's usage (memtables charged to it by a write buffer manager count there too)."""
    totals = dict.fromkeys(_DB_PROPERTIES, 0)
    for db in dbs:
        try:
            values = {part: int(db.property_int_value(name) or 0) for part, name in _DB_PROPERTIES.items()}
        except DbClosedError:  # closed by a rebalance since it was listed: it holds nothing any more
            continue
        for part, value in values.items():
            totals[part] += value
    totals["block_cache"] = int(cache.get_usage())
    totals["block_cache_pinned"] = int(cache.get_pinned_usage())
    return totals
