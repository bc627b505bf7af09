"""The worker's Kafka and state settings: RocksDB under one memory budget, a short broker poll."""

from __future__ import annotations

import asyncio
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


def test_the_worker_consumer_polls_the_broker_briefly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faust's fixed 1.5 s long poll could hold new records of a stage that long; the setting bounds it."""
    from agents import app as worker
    from agents.app import ShortPollConsumerThread, app

    monkeypatch.setattr(worker, "settings", worker.settings.model_copy(update={"fetch_max_wait_ms": 40}))

    async def built() -> int:
        thread = app.consumer._new_consumer_thread()
        assert isinstance(thread, ShortPollConsumerThread)
        consumer = thread._create_worker_consumer(app.consumer.transport)  # not started: no broker needed
        return int(consumer._fetch_max_wait_ms)

    assert asyncio.run(built()) == 40
