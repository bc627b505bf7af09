"""The sink agent's handling of one resource's versions (agents/stages.py `_sink`), with the target's write and the
retry tier replaced by recorders: what a reviewer's decision makes of later writes, and what a record back from a
retry tier keeps when it has to wait again. The order table is a plain dict, as the agent's table reads."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest

import agents.stages as stages
from pipeline.blocking import Queued, SinkOrder, _encode
from pipeline.conflicts import RESOLUTION_HEADER
from pipeline.deadletter import failure_headers, failure_info
from pipeline.errors import RetryableError, TargetUnavailableError
from pipeline.records import RoutedResource, encode
from tests.casebuilder import decision_response, routed_record

pytestmark = pytest.mark.wiring

CENTRAL = "urn:cdrsync:site:central"


class _Message:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]], offset: int) -> None:
        self.key, self.value, self.headers = b"pk", value, headers
        self.topic, self.partition, self.offset = "ready", 0, offset


class _Event:
    def __init__(self, value: bytes, headers: list[tuple[str, bytes]], offset: int) -> None:
        self.message = _Message(value, headers, offset)


class Sink:
    """`_sink` over a dict table; `fates` say how each write goes ("written" once they run out)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fates: list[str] | None = None) -> None:
        self.table: dict[str, Any] = {}
        self.fates = list(fates or [])
        self.written: list[RoutedResource] = []
        self.tier: list[tuple[bytes, list[tuple[str, bytes]]]] = []  # what retry_later sent: value, headers
        self.offset = 100
        monkeypatch.setattr(stages, "blocked_by_reference", self.table)
        monkeypatch.setattr(stages, "patient_sources_by_patient_key", {})

        self.retried: list[tuple[type[Exception], ...]] = []  # the errors each write may retry in process

        async def write(record: RoutedResource, attempts: int, versions: Any, prewritten: Any, retry_on: Any) -> None:
            self.retried.append(retry_on)
            if (self.fates.pop(0) if self.fates else "written") == "retrying":
                raise RetryableError("target answered 503")
            self.written.append(record)

        async def retry_later(stage: str, carried: Any, error: BaseException, attempts: int) -> bool:
            info = failure_info(
                stage, error, attempts=attempts, now_ms=0, origin=carried.origin, previous=carried.failure
            )
            self.tier.append((carried.value, failure_headers(info)))
            return True

        async def audit(*_: Any, **__: Any) -> None:
            return None

        monkeypatch.setattr(stages, "_write", write)
        monkeypatch.setattr(stages, "retry_later", retry_later)
        monkeypatch.setattr(stages, "emit_audit", audit)

    def arrive(self, value: bytes, headers: list[tuple[str, bytes]] | None = None) -> None:
        self.offset += 1  # each arrival, a fresh position on the ready topic (a tier forwards to a new one too)
        asyncio.run(stages._sink("sink", _Event(value, headers or [], self.offset), 3))  # type: ignore[arg-type]

    def back_from_tier(self) -> None:
        value, headers = self.tier.pop(0)
        self.arrive(value, headers)


def _form(status: str, lsn: int) -> RoutedResource:
    body = {**decision_response("Patient/pk"), "id": "qr1", "status": status}
    return routed_record({**body, "meta": {"source": "urn:cdrsync:site:site-a"}}, patient_key="pk", source_lsn=lsn)


def _source(record: RoutedResource) -> str:
    return str(orjson.loads(record.resource or "")["meta"]["source"])


def test_a_decision_that_waited_in_a_retry_tier_and_the_hospital_s_later_changes_are_written_as_central_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tier forwards the record with its failure headers only: the decision's header is gone when it comes back,
    so what it means must travel in the record itself. And the hospital's next change of the form, which writes
    over the decided version without a conflict, must flow back as well, or central and the hospitals part again."""
    sink = Sink(monkeypatch, ["retrying"])
    sink.arrive(encode(_form("completed", 10)), [(RESOLUTION_HEADER, b"take-incoming:3")])
    assert sink.written == [] and RESOLUTION_HEADER not in [name for name, _ in sink.tier[0][1]]
    sink.back_from_tier()
    sink.arrive(encode(_form("amended", 11)))  # the hospital changes its form again
    assert [(r.source_lsn, _source(r)) for r in sink.written] == [(10, CENTRAL), (11, CENTRAL)]
    other = replace(_form("completed", 12), source_id="qr2", target_id="qr2")
    sink.arrive(encode(other))  # a form no one decided on stays the hospital's
    assert _source(sink.written[-1]) == "urn:cdrsync:site:site-a"


@pytest.mark.parametrize("decision", [b"take-incoming:3", b"keep-target:3"])
def test_a_version_that_waited_behind_another_when_the_reviewer_decided_is_written_as_central_s(
    monkeypatch: pytest.MonkeyPatch, decision: bytes
) -> None:
    sink = Sink(monkeypatch, ["retrying"])
    sink.arrive(encode(_form("in-progress", 10)))  # fails: a retry tier, the form held behind it
    sink.arrive(encode(_form("completed", 11)))  # queued behind it, as the hospital sent it
    sink.arrive(encode(_form("in-progress", 9)), [(RESOLUTION_HEADER, decision)])  # the reviewer decides
    sink.back_from_tier()  # written, and the version queued behind it
    assert [(r.source_lsn, _source(r)) for r in sink.written] == [(10, CENTRAL), (11, CENTRAL)]


def test_a_group_delete_that_waits_again_after_its_tier_keeps_its_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Left by a worker before groups: the delete (Observation with Provenance) held the Observation alone, and an
    update of the Provenance waits in a tier. The delete comes back first and waits for it; released, it fails
    once more. Its copy in the tier must still be the same record (its identity), or it would queue behind itself
    and hold both resources for good."""
    delete = routed_record(
        {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}},
        patient_key="pk",
        op="DELETE",
        source_lsn=20,
    )
    delete = replace(delete, delete_with=["Provenance/p1"])
    provenance = {"resourceType": "Provenance", "id": "p1", "target": [{"reference": "Observation/o1"}]}
    update = routed_record(provenance, patient_key="pk", source_lsn=5)

    def failed_at(offset: int) -> list[tuple[str, bytes]]:
        error = RetryableError("target answered 503")
        return failure_headers(failure_info("sink", error, attempts=3, now_ms=0, origin=("ready", 0, offset)))

    sink = Sink(monkeypatch)
    sink.table.update(
        {
            "Observation/o1": {"blocker": "ready[0]@2", "state": "retrying", "queue": [], "resolved": []},
            "Provenance/p1": {"blocker": "ready[0]@1", "state": "retrying", "queue": [], "resolved": []},
        }
    )
    sink.arrive(encode(delete), failed_at(2))  # back from its tier: waits for the Provenance's update
    assert SinkOrder(sink.table).blocker("Observation/o1") == ("ready[0]@2", "queued")
    sink.fates = ["written", "retrying"]  # the update is written; the delete released behind it fails again
    sink.arrive(encode(update), failed_at(1))
    sink.back_from_tier()
    assert [r.op for r in sink.written] == ["UPDATE", "DELETE"]
    order = SinkOrder(sink.table)
    assert order.blocker("Observation/o1") is None and order.blocker("Provenance/p1") is None


def test_failure_headers_survive_a_queue() -> None:
    headers = (("cdrsync-stage", b"sink"), ("cdrsync-origin-offset", b"7"))
    item = Queued("ready[0]@7", b"pk", b"v", ("ready", 0, 9), ("A/1", "B/2"), headers)
    order = SinkOrder({"A/1": {"blocker": "ready[0]@1", "state": "retrying", "queue": [_encode(item)]}})
    assert order.written("A/1", "ready[0]@1") == item


def test_a_record_back_from_a_retry_tier_backs_off_in_process_only_for_an_unavailable_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first failure backs off in process for any retryable error; a record back from a tier only while the
    target is unavailable, so that a patient's records going round the tiers (waiting for a deleted Patient, say)
    do not each hold the sink's batch, every other patient's with it, for a full backoff again."""
    sink = Sink(monkeypatch, ["retrying", "retrying"])
    sink.arrive(encode(_form("completed", 10)))
    sink.back_from_tier()
    sink.back_from_tier()
    assert sink.retried == [(RetryableError,), (TargetUnavailableError,), (TargetUnavailableError,)]
    assert len(sink.written) == 1
