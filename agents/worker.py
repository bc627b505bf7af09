"""Entry point for `faust -A agents.worker worker`: the app with every agent registered."""

from faust.sensors.prometheus import setup_prometheus_sensors

from . import capture, memory, retry, stages, watchdog, web  # noqa: F401  (agents, tiers, capture, watchdog, trim, /healthz)
from .app import app

# Faust's own metrics are named faust_*, whatever the app id, so dashboards and rules can name them.
setup_prometheus_sensors(app, name_prefix="faust")

__all__ = ["app"]
