"""A worker's first start: Faust creates its tables' changelog topics and joins the group at once.

A broker may not list a topic it has just created. Faust's assignor then left those changelogs out of the
first assignment ("Ignoring missing topic"), the tables had no partitions to write to, and the next metadata
refresh brought a second rebalance within seconds, where the worker was seen to stop on passed-over offsets
and restart. The worker now waits for the broker to list what it subscribes to (agents/app.py).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka.admin import AdminClient

from pipeline.config import Config
from pipeline.kafkaadmin import declared_topics
from tests.bench.offsets import commit_group, delete_topics, end_offsets
from tests.integration.conftest import SETTINGS, Central, Worker

pytestmark = pytest.mark.integration
# aiokafka's metadata refresh (consumer_metadata_max_age_ms, agents/app.py) is 5 s: a rebalance it brings comes
# within that of the join; this waits well past it.
SETTLE_SECONDS = 15


def _log_messages(path: Path) -> list[str]:
    messages = []
    for line in path.read_bytes().splitlines():
        try:
            messages.append(str(orjson.loads(line).get("msg", "")))
        except orjson.JSONDecodeError:
            messages.append(line.decode(errors="replace"))
    return messages


def _topics_in(message: str) -> set[str]:
    """The topic names in one of aiokafka's subscription or assignment lines."""
    names = set()
    for part in message.split("'")[1::2]:
        if part and " " not in part:
            names.add(part)
    return names


def _starting_at_the_end(config: Config, app_id: str) -> None:
    """The new worker's groups start at the end of every topic: it joins, and has nothing to process."""
    bootstrap = SETTINGS.kafka_bootstrap
    ends = {plan.name: end_offsets(bootstrap, plan.name) for plan in declared_topics(config)}
    commit_group(bootstrap, app_id, ends)
    commit_group(bootstrap, f"{app_id}-audit", {config.topics.name("audit"): ends[config.topics.name("audit")]})
    commit_group(bootstrap, f"{app_id}-retry", {tier.name: ends[tier.name] for tier in config.topics.retry_tiers})


def test_a_new_worker_joins_once_with_every_topic_it_subscribes_to(
    stack: Central, config: Config, tmp_path: Path
) -> None:
    app_id = f"cdrsync-start-{uuid.uuid4().hex[:8]}"
    _starting_at_the_end(config, app_id)
    worker = Worker(app_id, tmp_path / "state", tmp_path / "worker.log")
    worker.start()
    try:
        time.sleep(SETTLE_SECONDS)
        messages = _log_messages(worker.log_path)
        assert worker.restarts == 0, f"the worker restarted on its first start (log: {worker.log_path})"
        assert not [m for m in messages if m.startswith("Ignoring missing topic")]
        subscribed = [m for m in messages if m.startswith("Subscribed to topic(s)")]
        assignments = [m for m in messages if m.startswith("Setting newly assigned partitions")]
        assert len(subscribed) == 1
        assert len(assignments) == 1, f"{len(assignments)} assignments in its first {SETTLE_SECONDS} s"
        wanted = _topics_in(subscribed[0])
        changelogs = {name for name in wanted if name.startswith(f"{app_id}-") and name.endswith("-changelog")}
        assert len(changelogs) >= 10  # every table's, created by this start
        assert wanted <= _topics_in(assignments[0])
        # Faust's seek to the committed offsets went through the worker's (agents/app.py): the topics this
        # group committed at 0 (the empty ones) are sought there, which aiokafka alone does not do
        assert [m for m in messages if m.startswith("sought ") and "committed at 0" in m]
    finally:
        worker.stop()
        delete_topics(SETTINGS.kafka_bootstrap, (f"{app_id}-",))
        admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap, "log_level": 3})
        for future in admin.delete_consumer_groups([app_id, f"{app_id}-audit", f"{app_id}-retry"]).values():
            with contextlib.suppress(Exception):  # a group that never committed: nothing to delete
                future.result(timeout=30)
