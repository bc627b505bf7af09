"""A write held for an unreachable target gives way when Faust stops the flow to hand partitions over
(agents/holding.py hold_interrupted): Faust waits for every record in processing before it gives them up."""

from __future__ import annotations

import pytest

from agents.app import app
from agents.holding import hold_interrupted

pytestmark = pytest.mark.wiring


def test_a_hold_gives_way_when_faust_stops_the_flow_for_a_rebalance() -> None:
    consumer = app.consumer  # built, not started: its flow flag is what Faust's revocation turns off
    consumer.resume_flow()
    assert hold_interrupted() is None
    consumer.stop_flow()  # what Faust's on_partitions_revoked does first
    try:
        assert hold_interrupted() == "its partitions are being reassigned"
    finally:
        consumer.resume_flow()
    assert hold_interrupted() is None
