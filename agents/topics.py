"""Faust topics and tables, all named from topics.yaml (no topic literal here)."""

from __future__ import annotations

import faust

from .app import app, config

_t = config.topics

source_changes = app.topic(*[config.source_topic(site) for site in config.source_sites()])
normalized = app.topic(_t.name("normalized"))
identified = app.topic(_t.name("identified"), partitions=_t.partitions_of("identified"))
ready = app.topic(_t.name("ready"), partitions=_t.partitions_of("ready"))
dead_letters = app.topic(_t.name("dlq"))
retry_tiers = [app.topic(tier.name) for tier in _t.retry_tiers]

_partitions = _t.partitions_of("identified")  # tables are co-partitioned with the identified topic
_json = faust.Schema(key_serializer="json", value_serializer="json")
released_by_reference = app.Table("released_by_reference", partitions=_partitions, schema=_json)
parked_by_reference = app.Table("parked_by_reference", partitions=_partitions, schema=_json)
waiting_by_reference = app.Table("waiting_by_reference", partitions=_partitions, schema=_json)
referrers_by_reference = app.Table("referrers_by_reference", partitions=_partitions, schema=_json)
