"""Every CDRSYNC_MEMORY_TRIM_SECONDS the worker gives memory it has freed back to the system (pipeline/memory.py)."""

from __future__ import annotations

from pipeline.memory import trim_freed_memory

from .app import app, settings

if settings.memory_trim_seconds > 0:

    @app.timer(interval=settings.memory_trim_seconds)
    async def return_freed_memory() -> None:
        """Return the heap's free pages to the operating system (a few milliseconds)."""
        trim_freed_memory()
