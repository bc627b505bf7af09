"""The audit store (pipeline/auditstore.py) against the real Kafka and PostgreSQL: while the audit database is
away nothing is committed and nothing is lost; once it is back every event is stored, and its offsets then
committed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.audit import AUDIT_TABLE_DDL, audit_event, insert_events
from pipeline.auditstore import AuditStore, seed_offsets
from tests.casebuilder import observation_for, routed_record
from tests.integration.conftest import SETTINGS, wait_for

pytestmark = pytest.mark.integration


def _dsn(database: str) -> str:
    secret = f" password={SETTINGS.pg_password_value}" if SETTINGS.pg_password_value else ""
    return f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} user={SETTINGS.pg_user} dbname={database}{secret}"


def _admin_sql(sql: str) -> None:
    with psycopg.connect(_dsn("postgres"), autocommit=True) as connection:
        connection.execute(sql)


def _stored(database: str) -> set[str]:
    try:
        with psycopg.connect(_dsn(database)) as connection:
            rows = connection.execute("SELECT source_id FROM audit.event").fetchall()
    except (psycopg.OperationalError, psycopg.errors.UndefinedTable):  # not there (yet)
        return set()
    return {row[0] for row in rows}


def _committed(group: str, topic: str) -> int | None:
    consumer = Consumer({"bootstrap.servers": SETTINGS.kafka_bootstrap, "group.id": group})
    try:
        [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return tp.offset if tp.offset >= 0 else None
    finally:
        consumer.close()


@pytest.fixture
def audit_database(run_id: str) -> Iterator[str]:
    name = f"audit_store_{run_id}".replace("-", "_").lower()
    yield name
    _admin_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_events_sent_while_the_audit_database_is_away_are_stored_once_it_is_back(
    run_id: str, audit_database: str
) -> None:
    topic, group = f"test.audit-store.{run_id}", f"test-audit-store-{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)
    records = [
        routed_record(observation_for(f"{run_id}-away-{n}", "p", n, 70.0 + n), patient_key="pk") for n in range(5)
    ]
    producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for record in records:
        producer.produce(topic, key=b"k", value=orjson.dumps(audit_event("written", record)))
    assert producer.flush(30) == 0

    store = AuditStore(
        SETTINGS.kafka_bootstrap,
        group,
        topic,
        f"test.audit-store.dlq.{run_id}",
        _dsn(audit_database),
        reconnect_seconds=0.5,
    )
    thread = threading.Thread(target=store.run, daemon=True)
    thread.start()
    try:
        # The database does not exist yet: the store keeps trying, and commits nothing meanwhile.
        time.sleep(3)  # several attempts (every 0.5 s)
        assert thread.is_alive()
        assert _committed(group, topic) is None
        assert _stored(audit_database) == set()

        _admin_sql(f'CREATE DATABASE "{audit_database}"')
        expected = {record.source_id for record in records}
        wait_for(lambda: _stored(audit_database) == expected or None, timeout=60, what="every event stored")
        wait_for(lambda: _committed(group, topic) == len(records) or None, timeout=30, what="the batch committed")
    finally:
        store.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_large_batch_is_stored_whole_and_a_replay_adds_nothing(run_id: str, audit_database: str) -> None:
    _admin_sql(f'CREATE DATABASE "{audit_database}"')
    records = [routed_record(observation_for(f"{run_id}-many-{n}", "p", n, 1.0), patient_key="pk") for n in range(2500)]
    events = [("audit.v1", 0, n, orjson.dumps(audit_event("written", r))) for n, r in enumerate(records)]
    with psycopg.connect(_dsn(audit_database)) as connection:
        connection.execute(AUDIT_TABLE_DDL)
        connection.commit()
        assert insert_events(connection, events) == 2500
        insert_events(connection, events[1000:1500])  # read again after a crash
        count = connection.execute("SELECT count(*), count(DISTINCT kafka_offset) FROM audit.event").fetchone()
    assert count == (2500, 2500)
    assert _stored(audit_database) == {r.source_id for r in records}


def test_an_upgraded_worker_s_store_starts_where_the_old_audit_agent_s_group_left_off(
    run_id: str, audit_database: str
) -> None:
    topic, old, group = f"test.audit-seed.{run_id}", f"test-audit-old-{run_id}", f"test-audit-new-{run_id}"
    admin = AdminClient({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)
    records = [routed_record(observation_for(f"{run_id}-seed-{n}", "p", n, 1.0), patient_key="pk") for n in range(5)]
    producer = Producer({"bootstrap.servers": SETTINGS.kafka_bootstrap})
    for record in records:
        producer.produce(topic, key=b"k", value=orjson.dumps(audit_event("written", record)))
    assert producer.flush(30) == 0
    previous = Consumer({"bootstrap.servers": SETTINGS.kafka_bootstrap, "group.id": old})
    previous.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)  # the old agent stored 0..2
    previous.close()
    _admin_sql(f'CREATE DATABASE "{audit_database}"')

    store = AuditStore(
        SETTINGS.kafka_bootstrap,
        group,
        topic,
        f"test.audit-seed.dlq.{run_id}",
        _dsn(audit_database),
        previous_group=old,
    )
    thread = threading.Thread(target=store.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: _committed(group, topic) == 5 or None, timeout=60, what="the rest committed")
    finally:
        store.stop()
        thread.join(30)
    assert _stored(audit_database) == {records[3].source_id, records[4].source_id}  # not 0..2 once more
    assert seed_offsets(SETTINGS.kafka_bootstrap, group, old, topic) == []  # it has its own offsets now
