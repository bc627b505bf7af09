"""A starting worker waits until the broker lists every topic it subscribes to (agents/app.py)."""

from __future__ import annotations

import logging

import pytest

from pipeline.kafkaadmin import wait_for_topics

pytestmark = pytest.mark.unit
TOPICS = {"fhir.ready.v1", "cdrsync-held_by_local_patient-changelog", "cdrsync-blocked_by_reference-changelog"}


class Broker:
    """Lists the topics of `answers` in turn, one answer per request (the last one from then on)."""

    def __init__(self, *answers: set[str] | Exception) -> None:
        self.answers = list(answers)
        self.requests = 0

    async def listed(self) -> set[str]:
        self.requests += 1
        answer = self.answers[0] if len(self.answers) == 1 else self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_it_waits_until_topics_created_just_before_are_listed() -> None:
    broker = Broker({"fhir.ready.v1"}, {"fhir.ready.v1", "cdrsync-held_by_local_patient-changelog"}, set(TOPICS))
    assert await wait_for_topics(TOPICS, broker.listed, timeout=30, interval=0.01) == []
    assert broker.requests == 3


async def test_topics_listed_at_once_cost_one_request() -> None:
    broker = Broker(set(TOPICS) | {"audit.v1"})
    assert await wait_for_topics(TOPICS, broker.listed, timeout=30, interval=0.01) == []
    assert broker.requests == 1


async def test_after_the_timeout_it_names_the_topics_still_missing() -> None:
    broker = Broker({"fhir.ready.v1"})
    missing = await wait_for_topics(TOPICS, broker.listed, timeout=0.1, interval=0.01)
    assert missing == ["cdrsync-blocked_by_reference-changelog", "cdrsync-held_by_local_patient-changelog"]
    assert broker.requests > 1


async def test_a_failed_request_counts_as_nothing_listed_and_it_asks_again() -> None:
    broker = Broker(ConnectionError("broker not answering"), set(TOPICS))
    assert await wait_for_topics(TOPICS, broker.listed, timeout=30, interval=0.01) == []
    assert broker.requests == 2


async def test_a_long_wait_says_which_topics_it_waits_for(caplog) -> None:
    broker = Broker({"fhir.ready.v1"})
    with caplog.at_level(logging.INFO, logger="cdrsync.kafka"):
        await wait_for_topics(TOPICS, broker.listed, timeout=0.2, interval=0.01, report_every=0.05)
    lines = [r.getMessage() for r in caplog.records if "waiting for the broker" in r.getMessage()]
    assert lines
    assert "cdrsync-blocked_by_reference-changelog" in lines[0]
    assert "fhir.ready.v1" not in lines[0]
