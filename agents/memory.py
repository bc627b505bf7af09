"""The worker's large allocations get mappings of their own (CDRSYNC_MEMORY_MMAP_THRESHOLD_KIB), and every
CDRSYNC_MEMORY_TRIM_SECONDS it gives memory it has freed back to the system (pipeline/memory.py)."""

from __future__ import annotations

from pipeline.memory import map_large_allocations, trim_freed_memory

from .app import app, settings

if settings.memory_mmap_threshold_kib > 0:
    map_large_allocations(settings.memory_mmap_threshold_kib * 1024)

if settings.memory_trim_seconds > 0:

    @app.timer(interval=settings.memory_trim_seconds)
    async def return_freed_memory() -> None:
        """Return the heap's free pages to the operating system (a few milliseconds)."""
        trim_freed_memory()
