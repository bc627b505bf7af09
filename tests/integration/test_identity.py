"""One person, two hospitals: one central Patient; a patient without the shared number waits for it."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from pipeline.cli import main
from pipeline.config import Config
from pipeline.errors import AwaitedWriteError, RetryableError
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.provenance import provenance_id
from pipeline.references import logical_system
from pipeline.tap import tap
from tests.casebuilder import (
    KVNR_SYSTEM,
    encounter_for,
    key_in_another_partition,
    move_of,
    observation_for,
    tumorboard_flag,
    with_kvnr,
)
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, patient_at_both_hospitals, wait_for

pytestmark = pytest.mark.integration


def test_same_person_at_two_hospitals_is_one_central_patient_owned_by_the_first(
    worker: Worker, stack: Central, site_a: SiteDatabase, site_b: SiteDatabase, run_id: str
) -> None:
    kvnr = f"X{run_id}"
    at_a = with_kvnr(
        {
            "resourceType": "Patient",
            "id": f"{run_id}-a-17",
            "gender": "female",
            "birthDate": "1966-02-03",
            "name": [{"family": "Müller", "given": ["Anna"]}],
            "identifier": [{"system": "urn:hospital-a:mrn", "value": "A-17"}],
        },
        kvnr,
    )
    at_b = with_kvnr(
        {
            "resourceType": "Patient",
            "id": f"{run_id}-b-4711",
            "gender": "female",
            "birthDate": "1966-02-03",
            "name": [{"family": "Mueller", "given": ["Anna M."]}],
            "identifier": [{"system": "urn:hospital-b:mrn", "value": "B-4711"}],
        },
        kvnr,
    )
    key = global_patient_key(KVNR_SYSTEM, kvnr)
    site_a.upsert(at_a)
    wait_for(lambda: stack.read("Patient", key), timeout=120, what="site-a's patient at central")
    site_b.upsert(at_b)
    encounter_a = {
        "resourceType": "Encounter",
        "id": f"{run_id}-enc",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{at_a['id']}"},
    }
    encounter_b = {**encounter_a, "subject": {"reference": f"Patient/{at_b['id']}"}}
    site_a.upsert(encounter_a)
    site_b.upsert(encounter_b)
    # site-b's route is `trigger: tumorboard-flag`: its clinician flags the encounter for the tumour board.
    site_b.upsert(tumorboard_flag(f"{run_id}-tb", at_b["id"], encounter_b["id"]))

    def merged():
        body = stack.read("Patient", key)
        values = {(i.get("system"), i.get("value")) for i in (body or {}).get("identifier", [])}
        return body if ("urn:hospital-b:mrn", "B-4711") in values else None

    body = wait_for(merged, timeout=120, what="site-b's identifiers on the central patient")
    assert body["name"] == at_a["name"], "site-b must not overwrite site-a's demographics"
    identifiers = {(i.get("system"), i.get("value")) for i in body["identifier"]}
    assert {
        ("urn:hospital-a:mrn", "A-17"),
        (logical_system("site-a", "Patient"), at_a["id"]),
        (logical_system("site-b", "Patient"), at_b["id"]),
        (KVNR_SYSTEM, kvnr),
    } <= identifiers
    assert sum(1 for system, _ in identifiers if system == KVNR_SYSTEM) == 1
    for site in ("site-a", "site-b"):
        enc = wait_for(
            lambda s=site: stack.read("Encounter", target_id(s, "Encounter", encounter_a["id"])),
            timeout=120,
            what=f"{site}'s encounter",
        )
        assert enc["subject"]["reference"] == f"Patient/{key}"
    status, found = stack.get(f"Patient?identifier={KVNR_SYSTEM}|{kvnr}")
    assert status == 200 and found["total"] == 1


def test_patient_without_the_shared_number_is_held_then_released_when_it_is_added(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, config: Config
) -> None:
    person = {"resourceType": "Patient", "id": f"{run_id}-nokvnr", "gender": "male", "birthDate": "1950-07-01"}
    weight = observation_for(f"{run_id}-nokvnr", person["id"], 1, 80.2)
    # What ops see of it: cdrsync_held_records, counted from the worker's tables every 15 s. Earlier tests may
    # have left records of their own held at site-a, so the gauge is read against where it stood before.
    held_gauge = {"site": "site-a", "reason": "missing_identifier"}
    held_before = worker.metric("cdrsync_held_records", **held_gauge)
    site_a.upsert_many([person, weight])

    def held_ids():
        items = tap(SETTINGS.kafka_bootstrap, config.topics.name("held"), idle_seconds=2)
        return {item["value"].get("source_id") for item in items if isinstance(item["value"], dict)}

    wait_for(lambda: {person["id"], weight["id"]} <= held_ids(), timeout=120, what="both records on the held topic")
    assert stack.read("Observation", target_id("site-a", "Observation", weight["id"])) is None
    wait_for(
        lambda: worker.metric("cdrsync_held_records", **held_gauge) >= held_before + 2,
        timeout=60,
        what="cdrsync_held_records to count the two held records",
    )
    held_before_release = worker.metric("cdrsync_held_records", **held_gauge)

    kvnr = f"Y{run_id}"
    site_a.upsert(with_kvnr(person, kvnr))  # the admission desk adds the insurance number
    key = global_patient_key(KVNR_SYSTEM, kvnr)
    wait_for(lambda: stack.read("Patient", key), timeout=120, what="the released patient")
    observation = wait_for(
        lambda: stack.read("Observation", target_id("site-a", "Observation", weight["id"])),
        timeout=120,
        what="the released observation",
    )
    assert observation["subject"]["reference"] == f"Patient/{key}"
    wait_for(
        lambda: worker.metric("cdrsync_held_records", **held_gauge) <= held_before_release - 2,
        timeout=60,
        what="cdrsync_held_records to drop by the two released records",
    )


def _cdrsync(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


def _reviews(capsys: pytest.CaptureFixture[str], local_id: str) -> list[dict]:
    code, out = _cdrsync(capsys, "identity", "list", "--site", "site-a", "--include-closed", "--json")
    assert code == 0
    return [r for r in map(orjson.loads, out.splitlines()) if r["local_patient_id"] == local_id]


@pytest.mark.parametrize("action", ["accept", "reject"])
def test_a_changed_shared_number_holds_the_patients_records_until_a_reviewer_decides(
    worker: Worker,
    stack: Central,
    site_a: SiteDatabase,
    run_id: str,
    config: Config,
    action: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kvnr = f"V{run_id}{action[0]}"
    key = global_patient_key(KVNR_SYSTEM, kvnr)
    typo = key_in_another_partition(f"W{run_id}{action[0]}", key, config.topics.partitions_of("identified"))
    other_key = global_patient_key(KVNR_SYSTEM, typo)
    person = with_kvnr({"resourceType": "Patient", "id": f"{run_id}-rev-{action}", "gender": "female"}, kvnr)
    encounter = encounter_for(f"{run_id}-rev-{action}", person["id"])
    earlier = observation_for(f"{run_id}-rev-{action}-0", person["id"], 1, 63.0, encounter["id"])
    site_a.upsert_many([person, encounter, earlier])
    encounter_ref = f"Encounter/{target_id('site-a', 'Encounter', encounter['id'])}"
    earlier_ref = f"Observation/{target_id('site-a', 'Observation', earlier['id'])}"
    wait_for(lambda: stack.read(*earlier_ref.split("/")), timeout=120, what="the patient's first record at central")
    reviews_before = worker.metric("cdrsync_identity_reviews_total", site="site-a")

    # The hospital changes the patient's insurance number: which person the records belong to is now in question.
    site_a.upsert(with_kvnr({**person, "gender": "other"}, typo))

    def on_topic(name: str) -> list[dict]:
        items = tap(SETTINGS.kafka_bootstrap, config.topics.name(name), idle_seconds=2)
        mine = f"Patient/{person['id']}"  # a Patient's own record names it as its patient too
        return [i for i in items if isinstance(i["value"], dict) and i["value"].get("patient_ref") == mine]

    [review] = wait_for(
        lambda: on_topic("identity_review"), timeout=120, what="the change on the identity review topic"
    )
    assert review["value"]["resource_type"] == "Patient" and typo in review["value"]["resource"]  # the change itself
    assert worker.metric("cdrsync_identity_reviews_total", site="site-a") == reviews_before + 1
    # Not applied: no second central Patient under the new number, the first one unchanged.
    assert stack.read("Patient", other_key) is None
    assert stack.read("Patient", key)["gender"] == "female"

    # Her later records go to neither person until someone has decided which one she is.
    weight = observation_for(f"{run_id}-rev-{action}", person["id"], 1, 64.0)
    site_a.upsert(weight)
    wait_for(
        lambda: any(i["value"].get("source_id") == weight["id"] for i in on_topic("held")),
        timeout=120,
        what="the later observation on the held topic",
    )
    observation_id = target_id("site-a", "Observation", weight["id"])
    assert stack.read("Observation", observation_id) is None
    [listed] = _reviews(capsys, person["id"])
    assert listed["status"] == "open"
    assert (listed["previous_patient"], listed["proposed_patient"]) == (f"Patient/{key}", f"Patient/{other_key}")

    code, out = _cdrsync(capsys, "identity", action, "site-a", person["id"], "--reason", "checked the card")
    assert code == 0 and "dry run" in out
    assert _reviews(capsys, person["id"])[0]["status"] == "open"  # a dry run decides nothing
    code, out = _cdrsync(
        capsys, "identity", action, "site-a", person["id"], "--reason", "checked the card", "--execute"
    )
    assert code == 0, out

    decided = wait_for(lambda: stack.read("Observation", observation_id), timeout=120, what="the released observation")
    [closed] = _reviews(capsys, person["id"])
    assert closed["status"] == f"{action}ed"
    if action == "accept":
        assert decided["subject"]["reference"] == f"Patient/{other_key}"
        assert (
            wait_for(lambda: stack.read("Patient", other_key), timeout=120, what="the Patient now named")["gender"]
            == "other"
        )
        # What she had before the change follows her: the earlier observation moves to the Patient now named, and
        # the previous Patient, which no other hospital holds, is deleted once nothing references it.
        moved = wait_for(
            lambda: (o := stack.read(*earlier_ref.split("/"))) and o["subject"]["reference"].endswith(other_key) and o,
            timeout=120,
            what="the earlier observation at the Patient now named",
        )
        assert moved["valueQuantity"] == earlier["valueQuantity"]
        wait_for(lambda: stack.read("Patient", key) is None, timeout=120, what="the previous Patient deleted")
        code, out = _cdrsync(capsys, "identity", "show", "site-a", person["id"])
        assert code == 0 and orjson.loads(out)["site_records_at_previous_patient"] == {"central": []}
        # The hospital's next version of the moved observation is written over the moved one, not held as a conflict.
        site_a.upsert({**earlier, "valueQuantity": {**earlier["valueQuantity"], "value": 63.5}})
        wait_for(
            lambda: stack.read(*earlier_ref.split("/"))["valueQuantity"]["value"] == 63.5,
            timeout=120,
            what="the next version of the moved observation",
        )
        assert stack.read(*earlier_ref.split("/"))["subject"]["reference"] == f"Patient/{other_key}"
        assert stack.read(*encounter_ref.split("/"))["subject"]["reference"] == f"Patient/{other_key}"
        # A new record in the encounter she had before the change is written at once: the new Patient's partition
        # knows that encounter as written (handed over by the previous one's), instead of holding the record for it
        # until its park expires.
        later = observation_for(f"{run_id}-rev-{action}-2", person["id"], 2, 62.5, encounter["id"])
        site_a.upsert(later)
        arrived = wait_for(
            lambda: stack.read("Observation", target_id("site-a", "Observation", later["id"])),
            timeout=120,
            what="a new observation in the earlier encounter",
        )
        assert arrived["subject"]["reference"] == f"Patient/{other_key}"
        assert arrived["encounter"]["reference"] == encounter_ref
    else:
        # What the reviewer is shown of the central Patient the review started from: the site's records there.
        code, out = _cdrsync(capsys, "identity", "show", "site-a", person["id"])
        there = sorted([earlier_ref, encounter_ref, f"Observation/{observation_id}"])
        assert code == 0 and orjson.loads(out)["site_records_at_previous_patient"] == {"central": there}
        assert "gender" not in out  # no patient data unless asked for
        assert decided["subject"]["reference"] == f"Patient/{key}"
        assert stack.read("Patient", other_key) is None and stack.read("Patient", key)["gender"] == "female"
        site_a.upsert({**with_kvnr(person, kvnr), "gender": "other"})  # the hospital corrects the number
        wait_for(lambda: stack.read("Patient", key)["gender"] == "other", timeout=120, what="the corrected Patient")


def test_accepting_moves_a_hospital_out_of_a_patient_another_hospital_still_holds(
    worker: Worker,
    stack: Central,
    site_a: SiteDatabase,
    site_b: SiteDatabase,
    run_id: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kvnr, corrected = f"M{run_id}", f"N{run_id}"
    shared = patient_at_both_hospitals(stack, site_a, site_b, kvnr, f"{run_id}-mv")
    key, new_key = shared.key, global_patient_key(KVNR_SYSTEM, corrected)
    earlier = observation_for(f"{run_id}-mv", shared.at_a["id"], 1, 71.0)
    site_a.upsert(earlier)
    earlier_id = target_id("site-a", "Observation", earlier["id"])
    wait_for(lambda: stack.read("Observation", earlier_id), timeout=120, what="site-a's observation at central")

    # site-a finds its patient was given someone else's number: hers is another one. A reviewer accepts that.
    site_a.upsert(with_kvnr(shared.at_a, corrected))
    wait_for(lambda: _reviews(capsys, shared.at_a["id"]), timeout=120, what="the identity review")
    code, out = _cdrsync(capsys, "identity", "accept", "site-a", shared.at_a["id"], "--reason", "card", "--execute")
    assert code == 0, out

    moved = wait_for(
        lambda: (o := stack.read("Observation", earlier_id)) and o["subject"]["reference"].endswith(new_key) and o,
        timeout=120,
        what="site-a's observation at the Patient now named",
    )
    assert moved["valueQuantity"]["value"] == 71.0

    def without_site_a() -> dict | None:
        body = stack.read("Patient", key)
        systems = {i.get("system") for i in (body or {}).get("identifier", [])}
        return body if body and logical_system("site-a", "Patient") not in systems else None

    # The person site-b holds keeps her Patient and her own records; site-a is no source of it any more.
    remaining = wait_for(without_site_a, timeout=120, what="the previous Patient without site-a")
    assert logical_system("site-b", "Patient") in {i.get("system") for i in remaining["identifier"]}
    assert stack.read("Encounter", target_id("site-b", "Encounter", shared.encounter_b["id"]))["subject"] == {
        "reference": f"Patient/{key}"
    }
    wait_for(
        lambda: stack.read("Provenance", provenance_id("site-a", f"Patient/{key}")) is None,
        timeout=60,
        what="site-a's Provenance of the previous Patient deleted",
    )

    # A record of site-a that reached the previous Patient after the move (as one waiting in a retry topic would):
    # `identity show` names it and `identity move` moves it too.
    late = {
        **moved,
        "id": target_id("site-a", "Observation", f"{earlier['id']}-late"),
        "subject": {"reference": f"Patient/{key}"},
        "meta": {"tag": moved["meta"]["tag"]},
    }
    stack.send(late, method="PUT")
    code, out = _cdrsync(capsys, "identity", "show", "site-a", shared.at_a["id"])
    assert orjson.loads(out)["site_records_at_previous_patient"] == {"central": [f"Observation/{late['id']}"]}
    code, out = _cdrsync(capsys, "identity", "move", "site-a", shared.at_a["id"])
    assert code == 0 and "dry run" in out and f"Observation/{late['id']}" in out
    code, out = _cdrsync(capsys, "identity", "move", "site-a", shared.at_a["id"], "--execute")
    assert code == 0, out
    wait_for(
        lambda: stack.read("Observation", late["id"])["subject"]["reference"] == f"Patient/{new_key}",
        timeout=120,
        what="the late observation moved",
    )
    assert stack.read("Patient", key) is not None  # site-b's patient is untouched by the second move


def test_a_move_a_later_review_overtook_takes_the_records_to_where_the_patient_is_now(
    stack: Central, run_id: str, config: Config
) -> None:
    """A MOVE K→P waited (P's version was late) while a second review took the patient on from P to Q: P held her
    once and no longer does. Her earlier records at K go to Q, not stay at K (which still shows her: its update
    without her waits behind the MOVE); if the hospital sent her to K again meanwhile, nothing moves."""
    from pipeline.fhirclient import FhirClient
    from pipeline.patientmove import move_site_records

    keys = {name: global_patient_key(KVNR_SYSTEM, f"O{run_id}{name}") for name in "KPQ"}
    local = f"{run_id}-ov,1|x"  # a local id with characters a token search must escape
    held = {"system": logical_system("site-a", "Patient"), "value": local}
    tag = {"meta": {"tag": [{"system": "urn:cdrsync:origin-site", "code": "site-a"}]}}

    def patient(key: str, *identifiers: dict) -> None:
        stack.send({"resourceType": "Patient", "id": key, "identifier": list(identifiers), **tag}, method="PUT")

    patient(keys["K"], held)
    patient(keys["P"], held)  # P held her once ...
    patient(keys["P"])  # ... and no longer does
    observation = {**observation_for(f"{run_id}-ov", "x", 1, 70.0), "id": f"{run_id}-ov-obs", **tag}
    stack.send({**observation, "subject": {"reference": f"Patient/{keys['K']}"}}, method="PUT")
    move = move_of(keys["K"], keys["P"], local=local, lsn=1, decided_ms=1)

    async def run(returned: bool) -> object:
        async with FhirClient(config.target("central")) as client:
            return await move_site_records(client, move, returned=returned)

    def subject() -> str:
        return stack.read("Observation", observation["id"])["subject"]["reference"]

    async def never_held() -> object:  # a Patient that never held her: the move waits for its version
        async with FhirClient(config.target("central")) as client:
            return await move_site_records(client, move_of(keys["K"], keys["Q"], local=local, lsn=1, decided_ms=1))

    with pytest.raises(AwaitedWriteError, match="does not hold"):  # round the last tier, for hours if need be
        asyncio.run(never_held())
    outcome = asyncio.run(run(returned=True))  # the hospital sent her to K again: nothing moves
    assert outcome.overtaken and subject() == f"Patient/{keys['K']}"
    with pytest.raises(RetryableError, match="no other central Patient"):  # Q's version is on its way
        asyncio.run(run(returned=False))
    patient(keys["Q"], held)  # she is at Q now
    outcome = asyncio.run(run(returned=False))
    assert not outcome.overtaken and outcome.to == keys["Q"] and subject() == f"Patient/{keys['Q']}"


def test_a_decision_taken_while_the_previous_patient_s_partition_lags_loses_no_delete(
    worker: Worker, stack: Central, run_id: str, config: Config
) -> None:
    """The identity stage's output after an accept, sent as it would be while the order stage of the previous
    Patient's partition lags behind (a back-load): the notice, the accepted Patient and the hospital's next records
    reach the new Patient's partition first, among them the delete of an observation whose create is still on its
    way in the previous Patient's partition. They wait for its hand-over: the observation is written there, then
    deleted, never left at the centre as if the hospital still had it."""
    from confluent_kafka import Producer

    from pipeline.ids import ORIGIN_TAG_SYSTEM
    from pipeline.patientmove import handover_notice
    from pipeline.records import encode
    from tests.casebuilder import routed_record

    partitions = config.topics.partitions_of("identified")
    previous = global_patient_key(KVNR_SYSTEM, f"L{run_id}")
    new = global_patient_key(KVNR_SYSTEM, key_in_another_partition(f"LN{run_id}", previous, partitions))
    local = f"{run_id}-lag"
    tag = {"tag": [{"system": ORIGIN_TAG_SYSTEM, "code": "site-a"}]}

    def patient_version(key: str, lsn: int) -> object:
        identifiers = [{"system": logical_system("site-a", "Patient"), "value": local}]
        body = {"resourceType": "Patient", "id": key, "identifier": identifiers, "meta": tag}
        return routed_record(body, patient_key=key, source_id=local, source_lsn=lsn)

    def observation(name: str, key: str, lsn: int, op: str = "UPDATE") -> object:
        body = {
            "resourceType": "Observation",
            "id": f"{run_id}-{name}",
            "status": "final",
            "code": {"text": "weight"},
            "subject": {"reference": f"Patient/{key}"},
            "valueQuantity": {"value": 70.0, "unit": "kg"},
            "meta": tag,
        }
        return routed_record(
            body, patient_key=key, source_id=name, source_lsn=lsn, op=op, dependencies=[f"Patient/{key}"]
        )

    move = move_of(previous, new, local=local, lsn=300, decided_ms=1_700_000_000_000)
    # Partitioned as the worker's own producers do (murmur2, Kafka's default), not librdkafka's default (CRC32).
    producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap, "partitioner": "murmur2_random"})
    topic = config.topics.name("identified")

    def send(*records: object) -> None:
        for record in records:
            producer.produce(topic, key=record.patient_key.encode(), value=encode(record))  # type: ignore[attr-defined]
        assert producer.flush(30) == 0

    # The new Patient's partition first: the notice, the accepted version, then the hospital's delete of the
    # observation it made before the review, and a new result.
    send(
        handover_notice(move),
        patient_version(new, 300),
        observation("lag-obs", new, 400, op="DELETE"),
        observation("lag-new", new, 410),
    )
    # The previous Patient's partition catches up: the patient, the observation's create, then the MOVE.
    send(patient_version(previous, 100), observation("lag-obs", previous, 200), move)

    written = wait_for(lambda: stack.read("Observation", f"{run_id}-lag-new"), timeout=120, what="the new result")
    assert written["subject"] == {"reference": f"Patient/{new}"}
    history = wait_for(
        lambda: (h := stack.history("Observation", f"{run_id}-lag-obs")) and h[-1] is None and h,
        timeout=120,
        what="the observation deleted after its create",
    )
    assert [version is None for version in history] == [False] * (len(history) - 1) + [True]
    assert stack.read("Observation", f"{run_id}-lag-obs") is None
