"""Entry point for `faust -A agents.worker worker`: the app with every agent registered."""

from faust.sensors.prometheus import setup_prometheus_sensors

from . import retry, stages, web  # noqa: F401  (registers the agents, the retry tiers, /healthz, /readyz)
from .app import app

# Faust's own metrics are named faust_*, whatever the app id, so dashboards and rules can name them.
setup_prometheus_sensors(app, name_prefix="faust")

__all__ = ["app"]
