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
held_records = app.topic(_t.name("held"))
conflicts = app.topic(_t.name("conflicts"))
identity_review = app.topic(_t.name("identity_review"))
retry_tiers = [app.topic(tier.name) for tier in _t.retry_tiers]

_partitions = _t.partitions_of("identified")  # tables are co-partitioned with the identified topic
_json = faust.Schema(key_serializer="json", value_serializer="json")
released_by_reference = app.Table("released_by_reference", partitions=_partitions, schema=_json)
parked_by_reference = app.Table("parked_by_reference", partitions=_partitions, schema=_json)
waiting_by_reference = app.Table("waiting_by_reference", partitions=_partitions, schema=_json)
referrers_by_reference = app.Table("referrers_by_reference", partitions=_partitions, schema=_json)
positions_by_reference = app.Table("positions_by_reference", partitions=_partitions, schema=_json)

_normalized_partitions = _t.partitions_of("normalized")  # the identity tables follow the normalized topic
patient_key_by_local_patient = app.Table(
    "patient_key_by_local_patient", partitions=_normalized_partitions, schema=_json
)
held_by_local_patient = app.Table("held_by_local_patient", partitions=_normalized_partitions, schema=_json)
# The sink's per-resource order (pipeline/blocking.py), co-partitioned with the ready topic.
blocked_by_reference = app.Table("blocked_by_reference", partitions=_t.partitions_of("ready"), schema=_json)
patient_sources_by_patient_key = app.Table("patient_sources_by_patient_key", partitions=_partitions, schema=_json)
