"""What ops and analysts rely on: dead letters with reasons, tap, idempotent topic administration."""

from __future__ import annotations

import orjson
import pytest

from pipeline.cli import main
from pipeline.config import Config
from pipeline.tap import tap
from tests.casebuilder import observation_for, patient
from tests.conftest import bundle_resources
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, central_id, wait_for

pytestmark = pytest.mark.integration


def _dead_letters(config: Config, source_id: str) -> list[dict]:
    return [
        item
        for item in tap(SETTINGS.kafka_bootstrap, config.topics.name("dlq"), idle_seconds=2)
        if isinstance(item["value"], dict) and (item["value"].get("after") or {}).get("id") == source_id
    ]


def test_invalid_resource_is_dead_lettered_with_its_reason_and_the_rest_flows(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    # A real sample: FHIR-Converter's VXU output has a DocumentReference without the required content.
    invalid = next(r for r in bundle_resources("VXU-V04-01") if r["resourceType"] == "DocumentReference")
    invalid = {**invalid, "id": f"{run_id}-bad-docref"}
    person = patient(f"{run_id}-poison")
    after = observation_for(f"{run_id}-poison", person["id"], 1, 64.0)
    site_a.upsert(invalid)
    site_a.upsert_many([person, after])

    letters = wait_for(lambda: _dead_letters(config, invalid["id"]), timeout=120, what="the dead letter")
    failure = letters[0]["failure"]
    assert (failure["stage"], failure["error_class"]) == ("normalize", "mapping")
    assert "invalid FHIR R4 DocumentReference: content: Field required" in failure["message"]
    assert failure["origin_topic"] == config.source_topic(config.sites["site-a"])
    # The original Debezium record travels unchanged, so a replay can reprocess it.
    assert orjson.loads(letters[0]["value"]["after"]["content"]) == invalid
    wait_for(
        lambda: stack.read("Observation", central_id("Observation", after["id"])),
        timeout=120,
        what="the observation written after the poison record",
    )
    assert stack.read("DocumentReference", central_id("DocumentReference", invalid["id"])) is None


def test_tap_prints_decoded_records_filtered_by_site_and_type(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    person = patient(f"{run_id}-tap")
    site_a.upsert(person)
    wait_for(lambda: stack.read("Patient", central_id("Patient", person["id"])), timeout=120, what="the patient")
    assert main(["tap", "normalized", "--site", "site-a", "--type", "Patient", "--idle", "3"]) == 0
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(
        line["value"]["site"] == "site-a" and line["value"]["resource_type"] == "Patient" for line in lines
    )
    mine = [line for line in lines if line["value"]["source_id"] == person["id"]]
    assert len(mine) == 1 and orjson.loads(mine[0]["value"]["resource"]) == person
    assert mine[0]["value"]["_schema"] == "normalized_resource"


def test_topics_apply_twice_changes_nothing_the_second_time(stack: Central, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topics", "apply"]) == 0
    capsys.readouterr()
    assert main(["topics", "apply"]) == 0
    assert capsys.readouterr().out.strip().endswith("0 change(s) applied")
