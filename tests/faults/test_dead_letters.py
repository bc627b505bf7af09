"""Poison records and `cdrsync dlq` end to end: every bad record is a dead letter with its reason,
everything else keeps flowing, and ops can list, show, replay and discard, audited.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from confluent_kafka import Producer

from pipeline.provenance import provenance_id
from tests.casebuilder import encounter_for, observation_for, patient
from tests.faults.conftest import (
    SETTINGS,
    Central,
    SiteDatabase,
    Worker,
    Workload,
    assert_clean,
    cdrsync,
    central_id,
    reconcile,
    settle,
    wait_for,
    worker_behind,
)
from tests.faults.proxy import Fault, FaultProxy
from tests.integration.conftest import audit_rows

pytestmark = pytest.mark.faults


@pytest.fixture
def worker(proxy: FaultProxy, tmp_path: Path) -> Iterator[Worker]:
    with worker_behind(
        proxy,
        tmp_path,
        CDRSYNC_SINK_ATTEMPTS="2",
        CDRSYNC_RETRY_TIER1_SECONDS="1",
        CDRSYNC_RETRY_TIER2_SECONDS="1",
        CDRSYNC_RETRY_TIER3_SECONDS="1",
    ) as worker:
        yield worker


def dead_letters(*args: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in cdrsync("dlq", "list", "--json", *args).splitlines() if line.strip()]


def letter_for(ref: str, *args: str) -> dict[str, Any] | None:
    return next((d for d in dead_letters(*args) if d["target_ref"] == ref), None)


def ref_of(resource: dict[str, Any]) -> str:
    return f"{resource['resourceType']}/{central_id(resource['resourceType'], resource['id'])}"


def test_poison_records_are_dead_lettered_with_their_reason_and_the_rest_flows(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    prefix = f"{run_id}-p"
    invalid = {"resourceType": "Observation", "id": f"{prefix}-invalid", "valueString": "no status, no code"}
    unknown = {"resourceType": "Foo", "id": f"{prefix}-foo"}
    oversize = observation_for(prefix, f"{prefix}-pat-0", 99, 1.0)
    oversize = {**oversize, "id": f"{prefix}-big", "note": [{"text": "x" * (5 * 1024 * 1024)}]}
    workload = Workload(prefix, patients=10)
    batches = workload.transactions()
    workload.load(site_a, batches[:5])
    site_a.upsert_many([invalid])
    site_a.upsert_many([unknown])
    site_a.upsert_many([oversize])
    producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    producer.produce("cdc.site-a.fhir.resource", b'{"not": "a debezium envelope"', f"{prefix}-garbage".encode())
    assert producer.flush(30) == 0
    workload.load(site_a, batches[5:])
    settle(stack, workload, timeout=300)

    def poison_letters() -> dict[str, dict[str, Any]]:
        found = {}
        for letter in dead_letters("--site", "site-a", "--stage", "normalize", "--since", "30m"):
            for name, resource in (("invalid", invalid), ("unknown", unknown), ("oversize", oversize)):
                if letter["target_ref"] and letter["target_ref"].endswith(
                    central_id(resource["resourceType"], resource["id"])
                ):
                    found[name] = letter
            if letter["error_class"] == "envelope":
                found["garbage"] = letter
        return found if len(found) == 4 else {}

    found = wait_for(poison_letters, timeout=120, what="all four poison records in the dead letters", interval=3)
    assert found["invalid"]["error_class"] == "mapping" and "invalid FHIR R4 Observation" in found["invalid"]["reason"]
    assert found["unknown"]["error_class"] == "mapping" and "unknown resource type 'Foo'" in found["unknown"]["reason"]
    assert found["oversize"]["error_class"] == "oversize" and "exceeds the limit" in found["oversize"]["reason"]
    assert found["garbage"]["error_class"] == "envelope"
    shown = cdrsync("dlq", "show", found["oversize"]["id"])
    assert "xxxxxxxx" not in shown and "withheld" in shown  # no clinical content without --with-patient-data
    assert "xxxxxxxx" in cdrsync("dlq", "show", found["oversize"]["id"], "--with-patient-data")
    result = reconcile(stack, workload, dead_refs=set())
    print(f"\ndead letters: {sorted((k, v['id']) for k, v in found.items())}")
    assert_clean(result, "poison records (4 dead-lettered outside the workload)")


def test_dead_letter_holds_later_versions_until_replayed_or_discarded(
    worker: Worker, proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    prefix = f"{run_id}-d"
    person = patient(prefix)
    stuck = observation_for(prefix, person["id"], 0, 1.0)
    other = observation_for(prefix, person["id"], 1, 5.0)
    stuck_ref = ref_of(stuck)
    # 1. The target fails every write of one Observation: after the tiers it is a dead letter.
    proxy.set(Fault("status", 500, path_contains=stuck_ref.split("/")[1]))
    site_a.upsert_many([person, stuck, other])
    wait_for(lambda: stack.read(*ref_of(other).split("/")), timeout=120, what="the patient's other Observation")
    letter = wait_for(lambda: letter_for(stuck_ref, "--stage", "sink"), timeout=180, what="the dead letter")
    assert letter["error_class"] == "target_unavailable" and letter["status"] == "open"

    # Each move to a retry tier and the dead letter are audited (DESIGN.md decision 9).
    def audited_steps() -> list[str]:
        target_id = central_id("Observation", stuck["id"])  # not its Provenance's rows, which share the source id
        steps = [step for step, row_target_id, _ in audit_rows(stuck["id"]) if row_target_id == target_id]
        return steps if "dead_lettered" in steps else []

    steps = wait_for(audited_steps, timeout=60, what="the audit rows of its retries and dead letter")
    # One per retry tier of topics.yaml, then the dead letter (at least once: a record read again is audited again);
    # before them perhaps `held` and `released` (it can reach identity before its Patient), and never `written`.
    failures = [step for step in steps if step in ("retried", "dead_lettered")]
    assert failures.count("retried") >= 3 and failures[-1] == "dead_lettered" and "written" not in steps
    # 2. A later version waits behind it: not written while the first is a dead letter.
    site_a.upsert({**stuck, "valueQuantity": {**stuck["valueQuantity"], "value": 2.0}})
    wait_for(lambda: worker.metric("cdrsync_held_behind_total") >= 1, timeout=120, what="the new version to wait")
    assert stack.read(*stuck_ref.split("/")) is None
    # 3. The target is fixed; a dry run changes nothing; the replay writes both versions, in order.
    proxy.clear()
    assert "dry run: 1 dead letters would be replayed" in cdrsync("dlq", "replay", letter["id"])
    assert letter_for(stuck_ref, "--stage", "sink")["status"] == "open"
    out = cdrsync("dlq", "replay", letter["id"], "--execute")
    assert "replay: 1/1" in out and "1 dead letters replayed and audited" in out
    wait_for(
        lambda: (body := stack.read(*stuck_ref.split("/"))) and body["valueQuantity"]["value"] == 2.0,
        timeout=120,
        what="the replayed version and the one behind it",
    )
    assert [r["valueQuantity"]["value"] for r in stack.history(*stuck_ref.split("/"))] == [1.0, 2.0]
    assert letter_for(stuck_ref, "--stage", "sink") is None  # no longer open
    assert letter_for(stuck_ref, "--stage", "sink", "--include-resolved")["status"] == "replayed"

    # 4. A version the target rejects for good (422): replay cannot help; discard releases the next version.
    document = observation_for(prefix, person["id"], 2, 7.0)
    doc_ref = ref_of(document)
    proxy.set(Fault("status", 422, path_contains=doc_ref.split("/")[1]))
    site_a.upsert(document)
    rejected = wait_for(lambda: letter_for(doc_ref, "--stage", "sink"), timeout=120, what="the rejected version")
    assert rejected["error_class"] == "rejected_by_target"
    fixed = {**document, "valueQuantity": {**document["valueQuantity"], "value": 8.0}}
    site_a.upsert(fixed)
    wait_for(lambda: worker.metric("cdrsync_held_behind_total") >= 2, timeout=120, what="the fix to wait behind it")
    proxy.clear()
    out = cdrsync("dlq", "discard", rejected["id"], "--reason", "superseded by the fixed version", "--execute")
    assert "1 dead letters discarded and audited" in out
    wait_for(lambda: stack.read(*doc_ref.split("/")), timeout=120, what="the fixed version")
    assert [r["valueQuantity"]["value"] for r in stack.history(*doc_ref.split("/"))] == [8.0]

    # 5. Each replay and discard is in the audit trail ops query.
    def audited() -> set[str]:
        conninfo = f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} user={SETTINGS.pg_user} dbname=central"
        with psycopg.connect(conninfo) as conn:
            rows = conn.execute(
                "SELECT step, detail FROM audit.event WHERE step IN ('replayed', 'discarded') AND detail LIKE %s",
                ("dead letter %",),
            ).fetchall()
        ids = {f"dead letter {letter['id']} replayed", f"dead letter {rejected['id']} discarded"}
        return {step for step, detail in rows if any(detail.startswith(i + " ") for i in ids)}

    assert wait_for(lambda: audited() == {"replayed", "discarded"}, timeout=60, what="audit events of both")


def test_a_dead_lettered_delete_holds_the_provenance_of_a_re_creation_until_replayed(
    worker: Worker, proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str
) -> None:
    """An Observation is deleted with its Provenance in one transaction. That delete fails for good, then the
    hospital creates the Observation again: the new version and its Provenance both wait behind the dead letter.
    Written at once, the Provenance would be deleted with the old Observation when the delete is replayed, and the
    re-created Observation would stand at the centre with no record of where it came from."""
    prefix = f"{run_id}-g"
    person = patient(prefix)
    observation = observation_for(prefix, person["id"], 0, 1.0)
    ref = ref_of(observation)
    provenance = provenance_id("site-a", ref)
    site_a.upsert_many([person, observation])
    wait_for(lambda: stack.read("Provenance", provenance), timeout=120, what="the Observation's Provenance")
    proxy.set(Fault("status", 500, path_contains=ref.split("/")[1]))  # the delete's transaction names it
    site_a.delete("Observation", observation["id"])
    letter = wait_for(lambda: letter_for(ref, "--stage", "sink"), timeout=180, what="the delete's dead letter")
    proxy.clear()
    held_before = worker.metric("cdrsync_held_behind_total")
    site_a.upsert({**observation, "valueQuantity": {**observation["valueQuantity"], "value": 3.0}})
    wait_for(
        lambda: worker.metric("cdrsync_held_behind_total") >= held_before + 2,
        timeout=120,
        what="the new Observation and its Provenance to wait behind the delete",
    )
    assert stack.read(*ref.split("/"))["valueQuantity"]["value"] == 1.0  # the old one, not deleted yet
    out = cdrsync("dlq", "replay", letter["id"], "--execute")
    assert "1 dead letters replayed and audited" in out
    wait_for(
        lambda: (body := stack.read(*ref.split("/"))) and body["valueQuantity"]["value"] == 3.0,
        timeout=120,
        what="the re-created Observation",
    )
    assert [v is None for v in stack.history(*ref.split("/"))] == [False, True, False]  # deleted, then created
    stored = wait_for(lambda: stack.read("Provenance", provenance), timeout=60, what="the new Provenance")
    assert stored["target"] == [{"reference": ref}]
    assert [v is None for v in stack.history("Provenance", provenance)] == [False, True, False]


def test_a_park_that_outlives_its_limit_is_a_dead_letter_even_across_a_restart(
    proxy: FaultProxy, stack: Central, site_a: SiteDatabase, run_id: str, tmp_path: Path
) -> None:
    prefix = f"{run_id}-k"
    person = patient(prefix)
    encounter = encounter_for(prefix, person["id"])
    waiting = observation_for(prefix, person["id"], 0, 1.0, encounter_id=encounter["id"])
    other = observation_for(prefix, person["id"], 1, 2.0)
    waiting_ref, encounter_ref = ref_of(waiting), ref_of(encounter)
    with worker_behind(proxy, tmp_path, CDRSYNC_PARK_LIMIT_SECONDS="5") as worker:
        # 1. An Observation whose Encounter never comes waits for it; the rest of the patient is written.
        site_a.upsert_many([person, waiting, other])
        wait_for(lambda: stack.read(*ref_of(other).split("/")), timeout=120, what="the patient's other Observation")

        def parked() -> bool:
            return worker.metric("cdrsync_parked_total", resource_type="Observation") >= 1

        wait_for(parked, timeout=60, what="the Observation to wait for its Encounter")
        # 2. A restarted worker finds the park in its table (its index of park deadlines is rebuilt) and,
        #    once the limit has passed, dead-letters it with the reason: nothing waits for good in silence.
        worker.stop()
        worker.start()
        letter = wait_for(
            lambda: letter_for(waiting_ref, "--stage", "order"), timeout=240, what="the expired park's dead letter"
        )
        assert letter["error_class"] == "park_expired"
        assert f"waited 5s for {encounter_ref}, which never arrived" in letter["reason"]
        assert stack.read(*waiting_ref.split("/")) is None

        def audited() -> list[tuple[str, str | None]]:
            rows = [(step, target_id) for step, target_id, _ in audit_rows(waiting["id"])]
            return rows if any(step == "dead_lettered" for step, _ in rows) else []

        rows = wait_for(audited, timeout=60, what="the expired park's audit row")
        assert ("dead_lettered", waiting_ref.split("/")[1]) in rows and "written" not in {step for step, _ in rows}
        # 3. The Encounter comes after all; ops replay the dead letter and the Observation follows it.
        site_a.upsert(encounter)
        wait_for(lambda: stack.read(*encounter_ref.split("/")), timeout=120, what="the late Encounter")
        assert "1 dead letters replayed and audited" in cdrsync("dlq", "replay", letter["id"], "--execute")
        written = wait_for(lambda: stack.read(*waiting_ref.split("/")), timeout=120, what="the replayed Observation")
        assert written["encounter"]["reference"] == encounter_ref
