"""Entry point for `faust -A agents.worker worker`: the app with every agent registered."""

from . import capture, memory, retry, stages, watchdog, web  # noqa: F401  (agents, tiers, capture, watchdog, trim, /healthz)
from .app import app

__all__ = ["app"]
