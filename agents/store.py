"""RocksDB for every table of a worker under one memory budget.

Faust gives each table partition its own block cache and memtables (a worker holds ~70 of them), so
a worker's memory grew with its state: +65 % from 10k to 100k patients (issue 7). Here all of them
share one block cache (CDRSYNC_ROCKSDB_CACHE_MIB) and one write buffer manager
(CDRSYNC_ROCKSDB_WRITE_BUFFER_MIB) whose memtables are charged to that cache, and index and filter
blocks live in it too: RocksDB's memory stays within the cache whatever the state's size. A memtable
over the budget is flushed to disk sooner; nothing is dropped (the changelog topics stay the source).

Registered as the store scheme "cdrsync" (agents/app.py: store="cdrsync://").
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import rocksdict
from faust.stores import STORES
from faust.stores import rocksdb as faust_rocksdb

from pipeline.memory import heap_usage, rocksdb_memory
from pipeline.settings import Settings

__all__ = ["BoundedOptions", "Store", "shared_memory", "worker_memory"]

_MIB = 1024 * 1024


@cache
def shared_memory() -> tuple[rocksdict.Cache, rocksdict.WriteBufferManager]:
    """The worker's one block cache and the write buffer manager charged to it (made on first use)."""
    settings = Settings()
    block_cache = rocksdict.Cache(settings.rocksdb_cache_mib * _MIB)
    buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
        min(settings.rocksdb_write_buffer_mib, settings.rocksdb_cache_mib) * _MIB, False, block_cache
    )
    return block_cache, buffers


class BoundedOptions(faust_rocksdb.RocksDBOptions):  # type: ignore[misc]
    """Faust's options for one table partition, with the shared cache and write buffer manager."""

    def as_options(self) -> Any:
        options = super().as_options()
        block_cache, buffers = shared_memory()
        table = rocksdict.BlockBasedOptions()
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_block_cache(block_cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        options.set_block_based_table_factory(table)
        options.set_write_buffer_manager(buffers)
        return options


class Store(faust_rocksdb.Store):  # type: ignore[misc]
    """Faust's RocksDB store (rocksdict) with BoundedOptions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rocksdb_options = BoundedOptions(**self.options, use_rocksdict=True)


def worker_memory(stores: Iterable[Any]) -> dict[str, int]:
    """Bytes by part: the C heap (pipeline/memory.py heap_usage) and RocksDB across every open partition of
    the given table stores (rocksdb_memory); for the gauge cdrsync_worker_memory_bytes (agents/web.py)."""
    databases = [db for store in stores if isinstance(store, Store) for db in list(store._dbs.values())]
    return {**heap_usage(), **rocksdb_memory(databases, shared_memory()[0])}


STORES.aliases["cdrsync"] = "agents.store:Store"
