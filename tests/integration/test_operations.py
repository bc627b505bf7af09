"""What ops and analysts rely on: dead letters with reasons, tap, idempotent topic administration."""

from __future__ import annotations

import base64
import dataclasses

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.cli import main
from pipeline.config import Config
from pipeline.deadletter import FailureInfo
from pipeline.dlq import DeadLetter, read_all, read_at, resolutions, resolve
from pipeline.errors import CdrsyncError
from pipeline.kafkaadmin import AcknowledgedProducer, keyed_producer
from pipeline.tap import tap
from tests.casebuilder import observation_for, patient
from tests.conftest import bundle_resources
from tests.integration.conftest import SETTINGS, Central, SiteDatabase, Worker, audit_rows, central_id, wait_for

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
    # And it is audited, named by the row it came from (DESIGN.md decision 9: every dead letter).
    audited = wait_for(lambda: audit_rows(invalid["id"]), timeout=60, what="the dead letter's audit row")
    assert [step for step, _, _ in audited] == ["dead_lettered"]


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


def test_records_are_read_by_id_where_they_are(stack: Central, run_id: str) -> None:
    """`dlq show`, `dlq replay <id>` and `conflicts show` read the records they name, not the whole topic."""
    topic = f"test.read-at.{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])[topic].result(timeout=30)
    try:
        producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap})
        for n in range(6):
            producer.produce(topic, f"record {n}".encode(), partition=n % 2)
        assert producer.flush(30) == 0
        found = {
            f"{m.partition()}:{m.offset()}": m.value()
            for m in read_at(SETTINGS.kafka_bootstrap, topic, ["0:1", " 1:02", "0:99", "7:0", "0:1"])
        }
        assert found == {"0:1": b"record 2", "1:2": b"record 5"}  # past the end, no such partition: left out
    finally:
        admin.delete_topics([topic])


def test_a_topic_is_read_to_its_end_however_many_records_it_holds(stack: Central, run_id: str) -> None:
    """`dlq list|replay`, `conflicts list` and every resolution read whole topics (read_all): each partition
    to the end it had when the read began, not only its first fetch. A read that stopped early left dead
    letters out of `replay --all` and showed replayed ones open again."""
    topic = f"test.read-all.{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(timeout=30)
    try:
        producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap, "linger.ms": 50})
        for n in range(6000):
            producer.produce(topic, f"record {n}".encode() * 10, partition=n % 3)
        assert producer.flush(30) == 0
        read = [(m.partition(), m.offset()) for m in read_all(SETTINGS.kafka_bootstrap, topic)]
        assert len(read) == 6000
        for partition in range(3):
            assert [o for p, o in read if p == partition] == list(range(2000))
    finally:
        admin.delete_topics([topic])


def test_operator_commands_and_the_retry_tiers_send_records_as_large_as_the_worker_writes(
    stack: Central, run_id: str
) -> None:
    """A ready record of several MB that fails for a while goes through a retry tier (the forwarder), and a
    dead letter of one is replayed: their producer (keyed_producer) takes what the broker and the worker do,
    not librdkafka's default 1 MB, which made the forwarder exit on such a record, again after each restart."""
    topic = f"test.large.{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=30)
    try:
        producer = AcknowledgedProducer(SETTINGS.kafka_bootstrap)
        large = b"x" * (5 * 1024 * 1024)
        producer.produce(topic, large, b"key")
        producer.finish("large record")
        (found,) = read_at(SETTINGS.kafka_bootstrap, topic, ["0:0"])
        assert found.value() == large
    finally:
        admin.delete_topics([topic])


def test_a_dead_letter_is_recorded_as_replayed_only_once_kafka_took_its_replay(
    stack: Central, run_id: str, config: Config
) -> None:
    """`dlq replay` sends each letter back, then records it as replayed: a record saying replayed while the
    replay never reached Kafka would take the letter out of the lists and out of the next `--all`. Kafka takes
    one replay here and refuses the other (its partition does not exist): only the first is recorded."""
    back, resolved, audit = f"test.replay.{run_id}", f"test.resolved.{run_id}", f"test.audit.{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for future in admin.create_topics(
        [NewTopic(t, num_partitions=1, replication_factor=1) for t in (back, resolved, audit)]
    ).values():
        future.result(timeout=30)
    topics = dict(config.topics.topics)
    for key, name in (("dlq_resolved", resolved), ("audit", audit)):
        topics[key] = topics[key].model_copy(update={"name": name})
    ours = dataclasses.replace(config, topics=config.topics.model_copy(update={"topics": topics}))
    try:
        failed = FailureInfo("normalize", "mapping", "unmapped", 1, 0, 0, back, 0, 5)
        letters = [
            DeadLetter(0, offset, 0, b"key", f"value {offset}".encode(), [], info, None, "site-a", "Observation", None)
            for offset, info in ((1, failed), (2, dataclasses.replace(failed, origin_partition=7)))
        ]
        with pytest.raises(CdrsyncError, match="the replay of 0:2"):
            resolve(SETTINGS.kafka_bootstrap, ours, letters, "replay")
        assert [m.value() for m in read_all(SETTINGS.kafka_bootstrap, back)] == [b"value 1"]
        assert set(resolutions(SETTINGS.kafka_bootstrap, resolved)) == {"0:1"}
    finally:
        admin.delete_topics([back, resolved, audit])


def test_discarding_a_dead_letter_that_does_not_decode_leaves_no_new_one(
    worker: Worker, stack: Central, run_id: str, config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    """A record on the ready topic that is not one of ours (a mixed-version upgrade, a foreign writer) is a
    dead letter of the sink. Discarding it sends it back with the discard header so that what waits behind
    it goes on; nothing can wait behind a record that never decoded, and it must not come back as a new one."""
    ready, dlq = config.topics.name("ready"), config.topics.name("dlq")
    producer = keyed_producer(SETTINGS.kafka_bootstrap)
    key, foreign, marker = f"{run_id}-undecodable", b"not a record of ours", b"nor is this one"
    producer.produce(ready, foreign, key.encode())
    assert producer.flush(30) == 0

    def letters() -> list[bytes]:
        found = tap(SETTINGS.kafka_bootstrap, dlq, idle_seconds=2)
        return [base64.b64decode(item["value"]["_base64"]) for item in found if item["key"] == key]

    wait_for(lambda: letters() == [foreign] or None, timeout=120, what="the sink's dead letter")
    (first,) = [item for item in tap(SETTINGS.kafka_bootstrap, dlq, idle_seconds=2) if item["key"] == key]
    named = ["dlq", "discard", f"{first['partition']}:{first['offset']}", "--reason", "test", "--execute"]
    assert main(named) == 0
    assert main(named) != 0  # already discarded: not again unless asked (--include-resolved)
    assert "already resolved" in capsys.readouterr().err
    # Under the same key, so behind the discard in its partition: once its dead letter is there, the sink took
    # the discard before it.
    producer.produce(ready, marker, key.encode())
    assert producer.flush(30) == 0
    wait_for(lambda: marker in letters() or None, timeout=120, what="the next record's dead letter")
    assert letters() == [foreign, marker], "the discarded record came back as a new dead letter"


def test_dlq_show_names_a_dead_letter_by_id_and_refuses_what_is_not_one(
    worker: Worker, stack: Central, site_a: SiteDatabase, run_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    invalid = next(r for r in bundle_resources("VXU-V04-01") if r["resourceType"] == "DocumentReference")
    invalid = {**invalid, "id": f"{run_id}-show-docref"}
    site_a.upsert(invalid)
    target = central_id("DocumentReference", invalid["id"])

    def listed() -> dict | None:
        assert main(["dlq", "list", "--json", "--site", "site-a", "--stage", "normalize"]) == 0
        rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
        return next((row for row in rows if (row["target_ref"] or "").endswith(target)), None)

    letter = wait_for(listed, timeout=120, what="the dead letter in `dlq list`")
    assert main(["dlq", "show", letter["id"]]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["id"] == letter["id"] and shown["target_ref"].endswith(target)
    assert main(["dlq", "show", "0:999999999"]) == 2
    assert "no dead letter 0:999999999" in capsys.readouterr().err
    assert main(["dlq", "show", "latest"]) == 2
    assert "'latest' is not a record id" in capsys.readouterr().err
