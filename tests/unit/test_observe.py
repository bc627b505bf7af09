"""What the worker reports about a record: metric labels, log correlation fields, held counts, readiness."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Iterator

import pytest

from pipeline.config import Config
from pipeline.errors import TargetAuthError
from pipeline.fhirclient import classify_response
from pipeline.observe import Readiness, held_counts, record_fields, route_labels
from pipeline.records import NormalizedResource, encode
from tests.casebuilder import routed_record

pytestmark = pytest.mark.unit
ROUTED = routed_record(
    {"resourceType": "Observation", "subject": {"display": "Jane Doe"}},
    site="site-b",
    source_id="obs-1",
    target_id="0f7c2b4e-0000-5000-8000-000000000001",
    patient_key="p",
    op="CREATE",
    origin=("cdc.site-b.fhir.resource", 2, 41),
    source_version=None,
    source_lsn=987654,
    content_hash=None,
    source_commit_ms=1,
    captured_ms=2,
)
NORMALIZED = NormalizedResource(
    source_commit_ms=1,
    captured_ms=2,
    origin_topic="cdc.site-a.fhir.resource",
    origin_partition=0,
    origin_offset=7,
    site="site-a",
    resource_type="Patient",
    source_id="p1",
)


def test_route_labels_of_a_source_change_name_its_site(config: Config) -> None:
    assert route_labels(config, "cdc.site-a.fhir.resource", b'{"not": "avro"}') == ("site-a", "")


def test_route_labels_of_our_records_come_from_the_record(config: Config) -> None:
    assert route_labels(config, "fhir.ready.v1", encode(ROUTED)) == ("site-b", "central")
    assert route_labels(config, "fhir.normalized.v1", encode(NORMALIZED)) == ("site-a", "")


def test_route_labels_of_unreadable_records_are_empty(config: Config) -> None:
    assert route_labels(config, "fhir.ready.v1", b"garbage") == ("", "")
    assert route_labels(config, "fhir.ready.v1", None) == ("", "")


def test_record_fields_carry_positions_and_target_id_never_content() -> None:
    fields = record_fields(ROUTED)
    assert fields == {
        "site": "site-b",
        "resource_type": "Observation",
        "source_topic": "cdc.site-b.fhir.resource",
        "source_partition": 2,
        "source_offset": 41,
        "source_lsn": 987654,
        "target": "central",
        "target_ref": "Observation/0f7c2b4e-0000-5000-8000-000000000001",
    }
    assert "Jane" not in repr(fields)


def test_held_counts_by_site_and_reason() -> None:
    held = [("site-a|p1", ["r1", "r2"]), ("site-b|p9", ["r3"])]
    parked = [
        [{"record": base64.b64encode(encode(ROUTED)).decode(), "ref": "Observation/x"}],
        [{"record": "not base64 avro", "ref": "Condition/y"}],
    ]
    counts = asyncio.run(held_counts(held, parked))
    assert counts == {
        ("site-a", "missing_identifier"): 2,
        ("site-b", "missing_identifier"): 1,
        ("site-b", "reference"): 1,
        ("", "reference"): 1,
    }


def test_held_counts_tell_patients_under_identity_review_from_those_without_an_identifier() -> None:
    held = [("site-a|p1", ["r1", "r2"]), ("site-a|p2", ["r3"])]
    counts = asyncio.run(held_counts(held, [], under_review=lambda local: local == "site-a|p2"))
    assert counts == {("site-a", "missing_identifier"): 2, ("site-a", "identity_review"): 1}


def test_readiness_needs_all_three_checks() -> None:
    assert Readiness(True, True, True).ready
    for state in (Readiness(False, True, True), Readiness(True, False, True), Readiness(True, True, False)):
        assert not state.ready
        assert state.as_dict()["ready"] is False
    assert Readiness(True, False, True).as_dict()["checks"] == {
        "partitions_assigned": True,
        "tables_recovered": False,
        "target_reachable": True,
    }


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_have_their_own_error_class(status: int) -> None:
    with pytest.raises(TargetAuthError) as err:
        classify_response("PUT", status, b'{"resourceType":"OperationOutcome"}')
    assert err.value.error_class == "target_auth"


def test_counting_held_records_lets_the_event_loop_run_during_the_scan() -> None:
    """The worker counts its held and parked records in its event loop: a long scan must not hold up the stages
    for its whole length."""
    entry = {"record": base64.b64encode(encode(ROUTED)).decode(), "ref": "Observation/x"}
    scanned = 0
    seen_by_other_task: list[int] = []

    def parked() -> Iterator[list[dict[str, str]]]:
        nonlocal scanned
        for _ in range(1000):
            scanned += 1
            yield [entry]

    async def other_task() -> None:  # a stage, say: runs whenever the loop gets control
        while scanned < 1000:
            seen_by_other_task.append(scanned)
            await asyncio.sleep(0)

    async def both() -> Counter[tuple[str, str]]:
        other = asyncio.ensure_future(other_task())
        counts = await held_counts([("site-a|p1", ["r1"])], parked(), every=100)
        await other
        return counts

    counts = asyncio.run(both())
    assert counts == {("site-a", "missing_identifier"): 1, ("site-b", "reference"): 1000}
    assert any(0 < n < 1000 for n in seen_by_other_task)  # it ran in the middle of the scan
