"""The table store: every table partition of a worker under one RocksDB memory budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from faust import stores

from agents.store import BoundedOptions, Store, shared_memory

pytestmark = pytest.mark.unit


def test_the_cdrsync_scheme_is_the_bounded_store() -> None:
    assert stores.by_url("cdrsync://") is Store


def test_partitions_share_one_cache_and_keep_what_is_written(tmp_path: Path) -> None:
    options = BoundedOptions(write_buffer_size=64 * 1024, max_write_buffer_number=2, use_rocksdict=True)
    first, second = options.open(tmp_path / "t-0"), options.open(tmp_path / "t-1")
    value = b"x" * 512
    for n in range(20_000):  # well past one partition's memtables: flushes to disk happen
        (first if n % 2 else second)[f"k{n}".encode()] = value
    assert first[b"k19999"] == value and second[b"k0"] == value and first.get(b"k0") is None
    block_cache, buffers = shared_memory()
    assert shared_memory() == (block_cache, buffers)  # one per worker
    assert buffers.enabled() and 0 < buffers.get_usage() <= buffers.get_buffer_size()
    first.close()
    second.close()
    reopened = options.open(tmp_path / "t-1")
    assert reopened[b"k0"] == value and reopened.get(b"k1") is None
    reopened.close()
