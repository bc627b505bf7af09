"""SIGKILL the worker mid-stream, repeatedly: nothing is lost, nothing is duplicated."""

from __future__ import annotations

import pytest

from pipeline.references import logical_system
from tests.casebuilder import observation_for, patient
from tests.integration.conftest import Central, SiteDatabase, Worker, central_id, wait_for

pytestmark = pytest.mark.integration
PATIENTS, OBSERVATIONS = 40, 6


def _wave(prefix: str, first: int, count: int) -> list[list[dict]]:
    """One transaction per patient: the Patient and its Observations (some before the Patient)."""
    transactions = []
    for n in range(first, first + count):
        person = patient(prefix, n)
        observations = [observation_for(f"{prefix}-{n}", person["id"], k, 50 + n + k / 10) for k in range(OBSERVATIONS)]
        transactions.append([*observations[:2], person, *observations[2:]])
    return transactions


def _present(stack: Central, resources: list[dict]) -> int:
    return sum(stack.read(r["resourceType"], central_id(r["resourceType"], r["id"])) is not None for r in resources)


def test_sigkill_mid_stream_loses_and_duplicates_nothing(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    prefix = f"{run_id}-kill"
    waves = [_wave(prefix, 0, PATIENTS // 2), _wave(prefix, PATIENTS // 2, PATIENTS // 2)]
    everything = [r for wave in waves for tx in wave for r in tx]

    for tx in waves[0]:
        site_a.upsert_many(tx)
    wait_for(lambda: _present(stack, everything) >= 5, timeout=180, what="the first resources at central")
    worker.kill()  # mid-stream: most of wave 1 is still in flight
    for tx in waves[1]:
        site_a.upsert_many(tx)  # written while no worker runs
    # Updates while down: the last version must win at central.
    changed = [
        {**r, "valueQuantity": {**r["valueQuantity"], "value": 99.5}}
        for r in everything
        if r["resourceType"] == "Observation"
    ][:10]
    site_a.upsert_many(changed)
    worker.start()
    wait_for(lambda: _present(stack, everything) >= len(everything) // 2, timeout=180, what="half the resources")
    worker.kill()
    worker.start()
    wait_for(
        lambda: _present(stack, everything) == len(everything),
        timeout=300,
        what=f"all {len(everything)} resources at central",
    )

    latest = {(r["resourceType"], r["id"]): r for r in everything} | {(r["resourceType"], r["id"]): r for r in changed}
    wait_for(
        lambda: all(
            stack.read("Observation", central_id("Observation", r["id"]))["valueQuantity"]["value"] == 99.5
            for r in changed
        ),
        timeout=180,
        what="the updates made while the worker was down",
    )
    for (resource_type, source_id), source in latest.items():
        body = stack.read(resource_type, central_id(resource_type, source_id))
        if resource_type == "Observation":
            assert body["valueQuantity"] == source["valueQuantity"]
            assert (
                body["subject"]["reference"] == f"Patient/{central_id('Patient', source['subject']['reference'][8:])}"
            )
        else:
            assert body["identifier"][0] == source["identifier"][0]
        # Exactly one resource at central carries this source id: no duplicate was created.
        assert stack.count_by_identifier(resource_type, logical_system("site-a", resource_type), source_id) == 1
