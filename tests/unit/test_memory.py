"""The worker gives memory it has freed back to the operating system (pipeline/memory.py)."""

from __future__ import annotations

import pytest

from pipeline.memory import trim_freed_memory

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
