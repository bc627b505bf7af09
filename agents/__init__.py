"""Faust wiring: the app, its topics and tables, one agent per stage. Logic lives in `pipeline`."""
