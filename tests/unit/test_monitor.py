"""`cdrsync monitor`: lag arithmetic, configuration, and what it says when no source answers."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.monitor
from pipeline.config import Config
from pipeline.monitor import SourceCollector, consumed_topics, consumer_lag, parse_volumes
from pipeline.settings import Settings
from pipeline.status import samples_of

pytestmark = pytest.mark.unit


def test_lag_is_end_minus_committed_and_uncommitted_partitions_count_from_earliest() -> None:
    earliest = {("t", 0): 0, ("t", 1): 5, ("u", 0): 0}
    latest = {("t", 0): 10, ("t", 1): 9, ("u", 0): 3, ("other", 0): 100}
    committed = {("t", 0): 7}
    assert consumer_lag(earliest, latest, committed, ["t", "u"]) == {"t": 3 + 4, "u": 3}


def test_lag_is_never_negative() -> None:
    assert consumer_lag({}, {("t", 0): 5}, {("t", 0): 6}, ["t"]) == {"t": 0}


def test_the_workers_topics_are_sources_stages_and_retry_tiers(config: Config) -> None:
    topics = consumed_topics(config)
    assert topics[:2] == ["cdc.site-a.fhir.resource", "cdc.site-b.fhir.resource"]
    assert {"fhir.normalized.v1", "fhir.identified.v1", "fhir.ready.v1", "fhir.writeback.v1"} <= set(topics)
    assert "cdc.central.fhir.resource" in topics  # central's own changes (back-flow), captured by cdrsync
    assert [t for t in topics if ".retry." in t] == [tier.name for tier in config.topics.retry_tiers]
    assert config.topics.name("dlq") not in topics  # nobody consumes dead letters: that is their depth


def test_volumes_are_name_equals_path() -> None:
    assert parse_volumes(" state=/var/lib/cdrsync , kafka=/data/kafka,") == {
        "state": Path("/var/lib/cdrsync"),
        "kafka": Path("/data/kafka"),
    }
    assert parse_volumes("") == {}
    with pytest.raises(ValueError, match="name=path"):
        parse_volumes("/just/a/path")


def test_a_scrape_with_no_source_answering_reports_each_as_down(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline.monitor, "_TIMEOUT", 0.5)
    for name, value in {
        "KAFKA_BOOTSTRAP": "127.0.0.1:1",
        "CONNECT_URL": "http://127.0.0.1:1",
        "PG_PORT": "1",
        "PG_HOST": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)
    central = config.sites["central"]
    assert central.target is not None
    unreachable = central.model_copy(
        update={"target": central.target.model_copy(update={"fhir_base_url": "http://127.0.0.1:1/fhir"})}
    )
    offline = Config(topics=config.topics, sites={**config.sites, "central": unreachable})
    samples = samples_of(SourceCollector(Settings(), offline, ["cdrsync"]).collect())
    success = {s.labels["collector"]: s.value for s in samples if s.name == "cdrsync_monitor_collect_success"}
    assert success == {"kafka": 0, "connect": 0, "postgres": 0, "target": 1}
    assert {s.labels["target"]: s.value for s in samples if s.name == "cdrsync_target_up"} == {"central": 0}
    routes = {(s.labels["site"], s.labels["target"]) for s in samples if s.name == "cdrsync_route_info"}
    assert routes == {(site.site, route.target) for site in config.sites.values() for route in site.routes}
    assert ("site-a", "central") in routes


def test_describe_names_every_family_without_asking_anyone(config: Config) -> None:
    settings = Settings(KAFKA_BOOTSTRAP="127.0.0.1:1")  # type: ignore[call-arg]
    names = {family.name for family in SourceCollector(settings, config, []).describe()}
    assert {
        "cdrsync_consumer_lag_records",
        "cdrsync_topic_records",
        "cdrsync_connector_state",
        "cdrsync_connector_tasks",
        "cdrsync_replication_slot_lag_bytes",
        "cdrsync_replication_slot_retained_wal_bytes",
        "cdrsync_replication_slot_active",
        "cdrsync_target_up",
        "cdrsync_route_info",
    } <= names
