"""Faust topics and tables, all named from topics.yaml (no topic literal here)."""

from __future__ import annotations

from .app import app, config, table

_t = config.topics

source_changes = app.topic(
    *[config.source_topic(site) for site in [*config.source_sites(), *config.capture_sites()]]
)  # capture sites: back-flow (pipeline/capture.py)
normalized = app.topic(_t.name("normalized"))
identified = app.topic(_t.name("identified"), partitions=_t.partitions_of("identified"))
ready = app.topic(_t.name("ready"), partitions=_t.partitions_of("ready"))
dead_letters = app.topic(_t.name("dlq"))
audit_events = app.topic(_t.name("audit"))
held_records = app.topic(_t.name("held"))
conflicts = app.topic(_t.name("conflicts"))
identity_review = app.topic(_t.name("identity_review"))
identity_resolved = app.topic(_t.name("identity_resolved"))
retry_tiers = [app.topic(tier.name) for tier in _t.retry_tiers]

_partitions = _t.partitions_of("identified")  # tables are co-partitioned with the identified topic
released_by_reference = table("released_by_reference", _partitions)
parked_by_reference = table("parked_by_reference", _partitions)
waiting_by_reference = table("waiting_by_reference", _partitions)
referrers_by_reference = table("referrers_by_reference", _partitions)
positions_by_reference = table("positions_by_reference", _partitions)

_normalized_partitions = _t.partitions_of("normalized")  # the identity tables follow the normalized topic
patient_key_by_local_patient = table("patient_key_by_local_patient", _normalized_partitions)
held_by_local_patient = table("held_by_local_patient", _normalized_partitions)
# The sink's per-resource order (pipeline/blocking.py), co-partitioned with the ready topic.
blocked_by_reference = table("blocked_by_reference", _t.partitions_of("ready"))
patient_sources_by_patient_key = table("patient_sources_by_patient_key", _partitions)
