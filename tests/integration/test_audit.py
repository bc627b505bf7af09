"""Every sync step leaves an audit row (audit.v1 → PostgreSQL audit.event) with the hash of what was sent."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from pipeline.audit import audit_event
from pipeline.config import Config
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.sink import content_hash_of
from pipeline.tap import tap
from tests.casebuilder import KVNR_SYSTEM, observation_for, patient, routed_record, with_kvnr
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, audit_rows, central_id, wait_for

pytestmark = pytest.mark.integration


def test_written_resources_have_audit_rows_with_the_hash_sent(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    person = patient(f"{run_id}-audit")
    weight = observation_for(f"{run_id}-audit", person["id"], 1, 58.0)
    site_a.upsert_many([person, weight])
    written = wait_for(
        lambda: stack.read("Observation", central_id("Observation", weight["id"])),
        timeout=120,
        what="the observation at central",
    )
    rows = wait_for(
        lambda: [r for r in audit_rows(weight["id"]) if r[0] == "written"],
        timeout=120,
        what="the observation's audit row",
    )
    assert rows[-1][1] == central_id("Observation", weight["id"])
    assert rows[-1][2] == content_hash_of(written)  # the SHA-256 the central resource carries is the one audited
    assert wait_for(
        lambda: [r for r in audit_rows(person["id"]) if r[0] == "written"], timeout=120, what="the patient's audit row"
    )


def test_held_and_released_steps_are_audited(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    person = {"resourceType": "Patient", "id": f"{run_id}-audit-held", "gender": "female"}
    weight = observation_for(f"{run_id}-audit-held", person["id"], 1, 61.0)
    site_a.upsert_many([person, weight])
    wait_for(lambda: [r for r in audit_rows(weight["id"]) if r[0] == "held"], timeout=120, what="a 'held' audit row")
    site_a.upsert(with_kvnr(person, f"H{run_id}"))
    wait_for(
        lambda: stack.read("Patient", global_patient_key(KVNR_SYSTEM, f"H{run_id}")),
        timeout=120,
        what="the released patient",
    )
    steps = wait_for(
        lambda: [r[0] for r in audit_rows(weight["id"]) if r[0] in ("released", "written")] or None,
        timeout=120,
        what="'released' and 'written' rows",
    )
    wait_for(
        lambda: {"held", "released", "written"} <= {r[0] for r in audit_rows(weight["id"])},
        timeout=120,
        what=f"the observation's held -> released -> written trail (so far {steps})",
    )
    assert target_id("site-a", "Observation", weight["id"]) in {r[1] for r in audit_rows(weight["id"]) if r[1]}


def test_a_malformed_audit_event_is_dead_lettered_and_the_rest_of_its_batch_stored(
    worker: Worker, run_id: str, config: Config
) -> None:
    """The audit store inserts a batch at once; one bad event (a bug of ours) must not hold or lose the others."""
    records = [
        routed_record(observation_for(f"{run_id}-audit-batch", "p", n, 60.0 + n), patient_key="pk") for n in range(4)
    ]
    events = [audit_event("written", record) for record in records]
    bad = {**events[2], "source_id": f"{run_id}-audit-bad", "source_lsn": "not-a-number"}
    producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for event in [*events[:2], bad, *events[3:]]:
        producer.produce(config.topics.name("audit"), key=b"audit-batch", value=orjson.dumps(event))
    assert producer.flush(30) == 0

    for record in (records[0], records[1], records[3]):
        wait_for(lambda r=record: audit_rows(r.source_id), timeout=120, what=f"the audit row of {record.source_id}")

    def dead_letter() -> list[dict[str, Any]]:
        items = tap(SETTINGS.kafka_bootstrap, config.topics.name("dlq"), idle_seconds=2)
        return [i for i in items if isinstance(i["value"], dict) and i["value"].get("source_id") == bad["source_id"]]

    [letter] = wait_for(dead_letter, timeout=120, what="the malformed audit event's dead letter")
    assert letter["failure"]["stage"] == "audit"
    assert "not-a-number" in letter["failure"]["message"]  # the reason, named
    assert audit_rows(bad["source_id"]) == []
