"""The sink writes one patient's ready upserts as one transaction bundle; a bundle the target refuses is
split, so the good resources are still written and only the bad one is dead-lettered, with its reason.

The records are put on the ready topic directly (one producer flush, one patient key): the sink takes
them in one batch, as it does when the order stage releases a patient's resources together.
"""

from __future__ import annotations

import urllib.request
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson
import pytest

from pipeline.config import Config
from pipeline.kafkaadmin import keyed_producer
from pipeline.provenance import provenance_for
from pipeline.records import RoutedResource, encode
from pipeline.tap import tap
from tests.casebuilder import routed_record
from tests.integration.conftest import SETTINGS, Central, Worker, wait_for

pytestmark = pytest.mark.integration


def _ready(run_id: str, resource: dict[str, Any], offset: int) -> RoutedResource:
    key = f"{run_id}-bundle"
    return routed_record(resource, patient_key=key, op="CREATE", origin=("test", 0, offset), source_lsn=offset)


def _send(config: Config, records: list[RoutedResource]) -> None:
    """All in one produce request, so they reach the broker, and the sink's fetch, together: a batch closes
    as soon as nothing more is waiting, and records that arrived a few milliseconds apart could be two."""
    producer = keyed_producer(SETTINGS.kafka_bootstrap, linger_ms=10_000)  # flush() sends them, not the linger
    for record in records:
        producer.produce(config.topics.name("ready"), encode(record), record.patient_key.encode())
    assert producer.flush(30) == 0


def _patient_with_weights(run_id: str, tag: str, values: list[float | str]) -> list[dict[str, Any]]:
    person = {"resourceType": "Patient", "id": f"{run_id}-{tag}-p", "gender": "female"}
    weights = [
        {
            "resourceType": "Observation",
            "id": f"{run_id}-{tag}-w{n}",
            "status": "final" if isinstance(value, float) else value,  # a status no server accepts: refused
            "code": {"text": "body weight"},
            "subject": {"reference": f"Patient/{person['id']}"},
            "valueQuantity": {"value": value if isinstance(value, float) else 1.0, "unit": "kg"},
        }
        for n, value in enumerate(values)
    ]
    return [person, *weights]


def test_a_patients_resources_go_in_one_transaction(
    worker: Worker, stack: Central, run_id: str, config: Config
) -> None:
    applied = worker.metric("cdrsync_bundles_total", target="central", result="applied")
    resources = _patient_with_weights(run_id, "ok", [60.0, 61.0, 62.0, 63.0])
    _send(config, [_ready(run_id, r, n) for n, r in enumerate(resources)])
    for resource in resources:
        wait_for(
            lambda r=resource: stack.read(r["resourceType"], r["id"]), timeout=120, what=f"{resource['id']} at central"
        )
    assert worker.metric("cdrsync_bundles_total", target="central", result="applied") > applied
    # One transaction: the server gave every resource of it the same time. The sink's batch can close after the
    # first record when its stream takes it before the consumer has handed the rest over (seen once in CI: the
    # Patient alone, then the four observations), so the observations are what must share one.
    updated = {stack.read(r["resourceType"], r["id"])["meta"]["lastUpdated"] for r in resources[1:]}  # type: ignore[index]
    assert len(updated) == 1


def test_a_refused_bundle_is_split_and_only_the_bad_resource_is_dead_lettered(
    worker: Worker, stack: Central, run_id: str, config: Config
) -> None:
    split = worker.metric("cdrsync_bundles_total", target="central", result="split")
    resources = _patient_with_weights(run_id, "bad", [70.0, "not-a-status", 71.0])
    bad = resources[2]
    _send(config, [_ready(run_id, r, n) for n, r in enumerate(resources)])
    for resource in (r for r in resources if r is not bad):
        wait_for(
            lambda r=resource: stack.read(r["resourceType"], r["id"]), timeout=120, what=f"{resource['id']} at central"
        )

    def dead_letter() -> list[dict[str, Any]]:
        items = tap(SETTINGS.kafka_bootstrap, config.topics.name("dlq"), idle_seconds=2)
        return [i for i in items if isinstance(i["value"], dict) and i["value"].get("source_id") == bad["id"]]

    [letter] = wait_for(dead_letter, timeout=120, what="the refused resource's dead letter")
    assert (letter["failure"]["stage"], letter["failure"]["error_class"]) == ("sink", "rejected_by_target")
    assert stack.read("Observation", bad["id"]) is None
    assert worker.metric("cdrsync_bundles_total", target="central", result="split") == split + 1


def test_a_bundle_creates_only_where_the_target_holds_nothing_and_never_writes_over_what_it_does(
    worker: Worker, stack: Central, run_id: str, config: Config
) -> None:
    """New resources go into the bundle with the If-Match under which the server only creates. One the target
    already holds, put there by someone else, fails the transaction: the bundle is split, the new ones are
    written alone, and the other is a conflict for review, its content untouched."""
    split = worker.metric("cdrsync_bundles_total", target="central", result="split")
    resources = _patient_with_weights(run_id, "taken", [80.0, 81.0, 82.0])
    # Someone else's resource at that id (without a subject: its patient is not at the target yet).
    theirs = {**{k: v for k, v in resources[2].items() if k != "subject"}, "valueQuantity": {"value": 99.0}}
    request = urllib.request.Request(
        f"{stack.base_url}/Observation/{theirs['id']}",
        data=orjson.dumps(theirs),
        method="PUT",
        headers={"Content-Type": "application/fhir+json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201
    _send(config, [_ready(run_id, r, n) for n, r in enumerate(resources)])
    for resource in resources[:2]:
        wait_for(
            lambda r=resource: stack.read(r["resourceType"], r["id"]), timeout=120, what=f"{resource['id']} at central"
        )

    def conflict() -> list[dict[str, Any]]:
        items = tap(SETTINGS.kafka_bootstrap, config.topics.name("conflicts"), idle_seconds=2)
        return [
            i
            for i in items
            if isinstance(i["value"], dict) and i["value"].get("target_ref") == f"Observation/{theirs['id']}"
        ]

    wait_for(conflict, timeout=120, what="the conflict over the resource someone else put there")
    assert stack.read("Observation", theirs["id"])["valueQuantity"]["value"] == 99.0  # type: ignore[index]
    assert worker.metric("cdrsync_bundles_total", target="central", result="split") == split + 1


def test_a_patients_provenances_are_written_after_what_they_point_at_and_before_a_delete_takes_them(
    worker: Worker, stack: Central, run_id: str, config: Config
) -> None:
    """The sink writes Provenances alongside a patient's other records (pipeline/provenance.py
    runs_alongside): each only once its resource is written, and all before a delete that takes one with it."""
    resources = _patient_with_weights(run_id, "prov", [50.0, 51.0, 52.0, 53.0, 54.0])
    ready = [_ready(run_id, r, n) for n, r in enumerate(resources)]
    provenances = [provenance_for(record) for record in ready]
    gone, gone_provenance = ready[1], provenances[1]
    delete = replace(
        _ready(run_id, resources[1], len(ready)),
        op="DELETE",
        resource=None,
        delete_with=[gone_provenance.target_ref],
    )
    _send(config, [*ready, *provenances, delete])
    kept = [(r, p) for r, p in zip(ready, provenances, strict=True) if r is not gone]
    for _, provenance in kept:
        wait_for(
            lambda p=provenance: stack.read("Provenance", p.target_id),
            timeout=120,
            what=f"{provenance.target_ref} at central",
        )
    wait_for(lambda: stack.read(gone.resource_type, gone.target_id) is None, timeout=120, what="the deleted weight")
    assert stack.read("Provenance", gone_provenance.target_id) is None  # deleted with it, not written after it
    for record, provenance in kept:
        target = stack.read(record.resource_type, record.target_id)
        stored = stack.read("Provenance", provenance.target_id)
        assert target is not None and stored is not None
        assert stored["target"] == [{"reference": record.target_ref}]
        written = datetime.fromisoformat(stored["meta"]["lastUpdated"])
        assert written >= datetime.fromisoformat(target["meta"]["lastUpdated"])
    # the deleted one's Provenance was written before the delete took it: two versions, the second a deletion
    assert [v is None for v in stack.history("Provenance", gone_provenance.target_id)] == [False, True]
