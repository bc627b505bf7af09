"""Entry point for `faust -A agents.worker worker`: the app with every agent registered."""

from faust.sensors.prometheus import setup_prometheus_sensors

from . import stages  # noqa: F401  (registers the agents)
from .app import app

setup_prometheus_sensors(app)

__all__ = ["app"]
