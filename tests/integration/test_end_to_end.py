"""A change written in a hospital database arrives at the central FHIR server, correct, once, in order."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.identity import ORIGIN_TAG_SYSTEM
from pipeline.references import logical_system
from pipeline.resources import SUPPORTED_TYPES
from pipeline.tap import tap
from tests.casebuilder import encounter_for, observation_for, patient, tumour_case
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, central_id, wait_for

pytestmark = pytest.mark.integration
SYNC_TIMEOUT = 240


def _arrived(stack: Central, resources: list[dict], check=lambda body: True) -> list[str]:
    """Refs of resources not (yet) at central in the expected state."""
    missing = []
    for r in resources:
        body = stack.read(r["resourceType"], central_id(r["resourceType"], r["id"]))
        if body is None or not check(body):
            missing.append(f"{r['resourceType']}/{r['id']}")
    return missing


def _gone(stack: Central, resources: list[dict]) -> list[str]:
    return [
        f"{r['resourceType']}/{r['id']}"
        for r in resources
        if stack.read(r["resourceType"], central_id(r["resourceType"], r["id"])) is not None
    ]


def test_insert_update_delete_of_every_type_reaches_central(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    case = tumour_case(f"{run_id}-all")
    assert {r["resourceType"] for r in case} == SUPPORTED_TYPES
    site_a.upsert_many(case)
    wait_for(lambda: not _arrived(stack, case), timeout=SYNC_TIMEOUT, what="every inserted resource at central")

    for source in case:
        body = stack.read(source["resourceType"], central_id(source["resourceType"], source["id"]))
        assert body is not None
        assert {"system": ORIGIN_TAG_SYSTEM, "code": "site-a"} in body["meta"]["tag"]
        source_identifier = {"system": logical_system("site-a", source["resourceType"]), "value": source["id"]}
        identifiers = body["identifier"] if isinstance(body["identifier"], list) else [body["identifier"]]
        assert source_identifier in identifiers or source["resourceType"] == "QuestionnaireResponse"
        for element in ("status", "code", "intent", "gender", "birthDate", "valueQuantity", "item", "title"):
            if element in source:
                assert body.get(element) == source[element], f"{source['resourceType']}.{element} differs"
        if "subject" in source and source["subject"]["reference"].startswith("Patient/"):
            patient_id = source["subject"]["reference"].split("/")[1]
            assert body["subject"]["reference"] == f"Patient/{central_id('Patient', patient_id)}"

    updated = [{**r, "language": "de"} for r in case]
    site_a.upsert_many(updated)
    wait_for(
        lambda: not _arrived(stack, updated, lambda body: body.get("language") == "de"),
        timeout=SYNC_TIMEOUT,
        what="every update at central",
    )

    # Deleted in bundle order, the Patient first: a document table has no foreign keys to prevent it,
    # while the target refuses to delete what is still referenced. The pipeline must reorder.
    for r in case:
        site_a.delete(r["resourceType"], r["id"])
    wait_for(lambda: not _gone(stack, case), timeout=SYNC_TIMEOUT, what="every deleted resource gone from central")


def _failures_for(config: Config, target_ids: set[str]) -> list[dict]:
    """Retry-tier and dead-letter records of the given target ids."""
    names = [config.topics.name("dlq"), *(tier.name for tier in config.topics.retry_tiers)]
    return [
        item
        for name in names
        for item in tap(SETTINGS.kafka_bootstrap, name, idle_seconds=2)
        if isinstance(item["value"], dict) and item["value"].get("target_id") in target_ids
    ]


def test_observation_whose_patient_arrives_later_waits_for_it(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    prefix = f"{run_id}-late"
    person = patient(prefix)
    observation = observation_for(prefix, person["id"], 1, 71.5)
    site_a.upsert(observation)
    # Its patient is unknown, so the observation is held (visible to ops on the held topic), not written.
    wait_for(
        lambda: [
            item
            for item in tap(SETTINGS.kafka_bootstrap, config.topics.name("held"), idle_seconds=2)
            if item["value"].get("source_id") == observation["id"]
        ],
        timeout=60,
        what="the observation on the held topic",
    )
    assert stack.read("Observation", central_id("Observation", observation["id"])) is None

    site_a.upsert(person)
    wait_for(
        lambda: not _arrived(stack, [person, observation]),
        timeout=SYNC_TIMEOUT,
        what="patient and observation at central",
    )
    written_patient = stack.read("Patient", central_id("Patient", person["id"]))
    written_observation = stack.read("Observation", central_id("Observation", observation["id"]))
    assert written_patient["meta"]["lastUpdated"] <= written_observation["meta"]["lastUpdated"]
    ids = {central_id("Observation", observation["id"]), central_id("Patient", person["id"])}
    assert _failures_for(config, ids) == [], "the observation was rejected or retried instead of waiting"


def test_observation_whose_encounter_arrives_later_is_parked_and_written_right_after_it(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    prefix = f"{run_id}-park"
    person = patient(prefix)
    encounter = encounter_for(prefix, person["id"])
    observation = observation_for(prefix, person["id"], 1, 72.0, encounter_id=encounter["id"])
    site_a.upsert(person)
    wait_for(lambda: stack.read("Patient", central_id("Patient", person["id"])), timeout=SYNC_TIMEOUT, what="patient")
    parked_before = worker.metric("cdrsync_parked_total", resource_type="Observation")
    # Its Encounter is not written yet: the server would refuse the reference, so the order stage parks it.
    site_a.upsert(observation)
    wait_for(
        lambda: worker.metric("cdrsync_parked_total", resource_type="Observation") > parked_before,
        timeout=60,
        what="the observation to be parked for its encounter",
    )
    assert stack.read("Observation", central_id("Observation", observation["id"])) is None
    site_a.upsert(encounter)
    wait_for(lambda: not _arrived(stack, [encounter, observation]), timeout=SYNC_TIMEOUT, what="encounter, observation")
    written_encounter = stack.read("Encounter", central_id("Encounter", encounter["id"]))
    written_observation = stack.read("Observation", central_id("Observation", observation["id"]))
    assert written_observation["encounter"]["reference"] == f"Encounter/{central_id('Encounter', encounter['id'])}"
    assert written_encounter["meta"]["lastUpdated"] <= written_observation["meta"]["lastUpdated"]
    ids = {central_id("Observation", observation["id"]), central_id("Encounter", encounter["id"])}
    assert _failures_for(config, ids) == [], "the observation was rejected or retried instead of waiting"
