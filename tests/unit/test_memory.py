"""The worker gives memory it has freed back to the operating system and says where its memory is
(pipeline/memory.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agents.store import BoundedOptions, shared_memory
from pipeline.memory import heap_usage, rocksdb_memory, trim_freed_memory
from pipeline.metrics import MemoryCollector

pytestmark = pytest.mark.unit
_MIB = 1024 * 1024


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_freed_memory_scattered_in_the_heap_leaves_the_process() -> None:
    # A peak of 80 MiB in 2 KiB pieces (malloc, not Python's small-object allocator), one in 64 kept: the
    # heap is mostly free afterwards, but its top is held, so glibc does not give it back by itself.
    pieces = [bytearray(2048) for _ in range(40_000)]
    kept = pieces[::64]
    del pieces
    before = _rss()
    assert trim_freed_memory()
    after = _rss()
    assert before - after > 40 * _MIB, f"RSS {before // _MIB} MiB before the trim, {after // _MIB} MiB after"
    assert all(len(piece) == 2048 for piece in kept)  # what is still in use stays


def _in_use() -> int:
    usage = heap_usage()
    return usage["heap_in_use"] + usage["heap_mapped"]


def test_the_heap_reading_follows_what_is_allocated_and_freed() -> None:
    before = _in_use()
    blocks = [bytearray(64 * 1024) for _ in range(1024)]  # 64 MiB in blocks of 64 KiB
    during = _in_use()
    del blocks
    after = _in_use()
    assert during - before >= 64 * _MIB
    assert during - after >= 64 * _MIB


_AFTER_A_LARGE_FREE = """
import sys
from pipeline.memory import heap_usage, map_large_allocations
if sys.argv[1] == "fixed":
    assert map_large_allocations(128 * 1024)
bytearray(8 * 1024 * 1024)  # a mapped block of 8 MiB, freed at once: glibc raises its threshold to 8 MiB
mapped = heap_usage()["heap_mapped"]
batches = [bytearray(1024 * 1024) for _ in range(16)]  # what a fetched batch of records is like
print(heap_usage()["heap_mapped"] - mapped)
"""


def _mapped_after_a_large_free(mode: str) -> int:
    script = subprocess.run(
        [sys.executable, "-c", _AFTER_A_LARGE_FREE, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(script.stdout)


def test_large_allocations_keep_their_own_mapping_after_a_larger_one_was_freed() -> None:
    # glibc's own rising threshold puts them in the heap, where freeing them leaves holes; fixed, each
    # one is a mapping of its own that goes back to the system when freed.
    assert _mapped_after_a_large_free("fixed") >= 16 * _MIB
    assert _mapped_after_a_large_free("glibc") < _MIB


def test_rocksdb_memory_counts_unflushed_memtables_of_every_partition_and_the_shared_cache(tmp_path: Path) -> None:
    options = BoundedOptions(write_buffer_size=4 * _MIB, max_write_buffer_number=2, use_rocksdict=True)
    databases = [options.open(tmp_path / f"t-{n}") for n in range(3)]
    empty = rocksdb_memory(databases, shared_memory()[0])
    value = b"v" * 1000
    for n in range(1500):  # 1.5 MB per partition, under its memtable size: nothing is flushed yet
        for db in databases:
            db[f"k{n}".encode()] = value
    written = rocksdb_memory(databases, shared_memory()[0])
    assert written["memtables"] - empty["memtables"] >= 3 * 1500 * 1000
    assert written["block_cache"] >= written["memtables"]  # the memtables are charged to the shared cache
    for db in databases:
        db.flush()
    flushed = rocksdb_memory(databases, shared_memory()[0])
    assert flushed["memtables"] < written["memtables"] - 3 * 1000 * 1000
    assert databases[2][b"k1499"] == value
    for db in databases:
        db.close()


def test_a_partition_closed_by_a_rebalance_while_listed_does_not_fail_the_reading(tmp_path: Path) -> None:
    options = BoundedOptions(write_buffer_size=4 * _MIB, use_rocksdict=True)
    kept, revoked = options.open(tmp_path / "t-0"), options.open(tmp_path / "t-1")
    for db in (kept, revoked):
        db[b"k"] = b"v" * 100_000
    revoked.close()
    reading = rocksdb_memory([kept, revoked], shared_memory()[0])
    assert 100_000 <= reading["memtables"] < 2 * 100_000 + _MIB
    kept.close()


def test_the_memory_gauge_has_one_sample_per_part() -> None:
    registry = CollectorRegistry()
    registry.register(MemoryCollector(lambda: {"heap_in_use": 5 * _MIB, "memtables": 1024}))
    text = generate_latest(registry).decode()
    assert 'cdrsync_worker_memory_bytes{part="heap_in_use"} 5.24288e+06' in text
    assert 'cdrsync_worker_memory_bytes{part="memtables"} 1024.0' in text
