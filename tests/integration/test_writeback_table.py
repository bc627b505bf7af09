"""A hospital's copy written into its source table (writeback.method source-table,
pipeline/hospitaltable.py write_table_copy), against a real PostgreSQL: a late or replayed record never
replaces a copy made from a newer central version, and never brings back a copy deleted at a newer one.

Each test writes into a table of its own, shaped as the hospital's `fhir.resource`, in site-a's database
(outside what Debezium captures there), so that nothing it writes flows anywhere.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest

from pipeline.backflow import written_version
from pipeline.config import Config
from pipeline.demo import site_dsn
from pipeline.hospitaltable import (
    WRITEBACK_DELETION_DDL,
    RefusedByHospitalError,
    WriteBackSetupError,
    connect,
    write_table_copy,
)
from pipeline.records import RoutedResource
from tests.casebuilder import hospital_copy, untagged_copy

from .conftest import SETTINGS

pytestmark = pytest.mark.integration
SCHEMA = "cdrsync_test"


class HospitalTable:
    def __init__(self, dsn: str, table: str) -> None:
        self.dsn, self.table = dsn, table
        self.conn = psycopg.connect(dsn, autocommit=True)

    def write(self, copies: list[RoutedResource]) -> list[str]:
        async def run() -> list[str]:
            async with await connect("site-a", self.dsn, SETTINGS.pg_user) as connection:
                return [await write_table_copy(connection, SCHEMA, self.table, copy) for copy in copies]

        return asyncio.run(run())

    def row(self, copy: RoutedResource) -> tuple[int, dict[str, Any]] | None:
        with self.conn.cursor() as cursor:
            cursor.execute(
                f'SELECT version, content FROM {SCHEMA}."{self.table}" WHERE resource_type = %s AND id = %s',
                (copy.resource_type, copy.target_id),
            )
            found = cursor.fetchone()
        return None if found is None else (found[0], found[1])


@pytest.fixture
def hospital(config: Config) -> Iterator[HospitalTable]:
    site = config.sites["site-a"]
    dsn = site_dsn(site, SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value)
    table = f"resource_{uuid.uuid4().hex[:12]}"
    db = HospitalTable(dsn, table)
    with db.conn.cursor() as cursor:
        cursor.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        cursor.execute(f'CREATE TABLE {SCHEMA}."{table}" (LIKE fhir.resource INCLUDING ALL)')
    yield db
    with db.conn.cursor() as cursor:
        cursor.execute(f'DROP TABLE {SCHEMA}."{table}"')
        cursor.execute("DELETE FROM cdrsync.writeback_deletion WHERE source_table = %s", (f"{SCHEMA}.{table}",))
    db.conn.close()


def _copy(central_id: str, version: int, decision: str | None) -> RoutedResource:
    return hospital_copy(central_id, version, decision, target="site-a")


def _decision(row: tuple[int, dict[str, Any]] | None) -> str | None:
    return None if row is None else str(row[1]["code"]["text"])


def test_a_late_version_never_replaces_a_newer_row(hospital: HospitalTable) -> None:
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1, v2, v3 = (_copy(central_id, n, f"decision {n}") for n in (1, 2, 3))

    assert hospital.write([v2, v1]) == ["upserted", "superseded (version 2 there)"]  # v1 late: a replayed dead letter
    row = hospital.row(v2)
    assert _decision(row) == "decision 2" and row is not None and written_version(row[1]) == 2

    assert hospital.write([v3, v3]) == ["upserted", "unchanged"]  # the same version again is not rewritten
    row = hospital.row(v3)
    assert _decision(row) == "decision 3" and row is not None and row[0] == 2  # the row's own version: 2 writes


def test_a_deleted_row_is_not_brought_back_by_an_older_version(hospital: HospitalTable) -> None:
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v3, v5 = _copy(central_id, 3, "decision 3"), _copy(central_id, 5, "decision 5")
    deleted_at_2, deleted_at_4 = _copy(central_id, 2, None), _copy(central_id, 4, None)

    assert hospital.write([v3, deleted_at_2]) == ["upserted", "superseded (version 3 there)"]
    assert _decision(hospital.row(v3)) == "decision 3"

    assert hospital.write([deleted_at_4, deleted_at_4]) == ["deleted", "absent"]
    assert hospital.row(v3) is None
    assert hospital.write([v3]) == ["superseded (deleted at version 4 there)"]  # v3 read again: stays deleted
    assert hospital.row(v3) is None

    assert hospital.write([v5]) == ["upserted"]  # decided again after the deletion
    assert _decision(hospital.row(v5)) == "decision 5"


def test_a_deletion_read_before_its_upsert_still_wins(hospital: HospitalTable) -> None:
    """Records of one resource can arrive out of order (a dead letter replayed after what followed it)."""
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1, deleted_at_2 = _copy(central_id, 1, "decision 1"), _copy(central_id, 2, None)

    assert hospital.write([deleted_at_2, v1]) == ["absent", "superseded (deleted at version 2 there)"]
    assert hospital.row(v1) is None


def test_a_row_without_a_version_is_replaced(hospital: HospitalTable) -> None:
    """A row written before versions were tagged (or by hand) holds no version: any version replaces it."""
    central_id = f"wb-{uuid.uuid4().hex[:12]}"
    v1 = _copy(central_id, 1, "decision 1")
    untagged = untagged_copy(v1)
    with hospital.conn.cursor() as cursor:
        cursor.execute(
            f'INSERT INTO {SCHEMA}."{hospital.table}" (resource_type, id, content) VALUES (%s, %s, %s)',
            ("Basic", v1.target_id, orjson.dumps(untagged).decode()),
        )

    assert hospital.write([v1]) == ["upserted"]
    assert _decision(hospital.row(v1)) == "decision 1"


def test_a_database_user_without_create_rights_needs_the_marks_table_made_for_it(config: Config) -> None:
    """A hospital's DBA may give cdrsync rights on its tables only: then the worker cannot make its table of
    deletion marks, says so (a dead letter's reason, to replay), and works once the DBA has made it."""
    site = config.sites["site-a"]
    admin_dsn = site_dsn(site, SETTINGS.pg_host, SETTINGS.pg_port, SETTINGS.pg_user, SETTINGS.pg_password_value)
    run = uuid.uuid4().hex[:12]
    database, role, password = f"cdrsync_test_{run}", f"cdrsync_test_{run}", uuid.uuid4().hex
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {database}")
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    hospital_dsn = f"host={SETTINGS.pg_host} port={SETTINGS.pg_port} dbname={database} user="
    try:
        with psycopg.connect(hospital_dsn + SETTINGS.pg_user, autocommit=True) as owner:
            owner.execute("CREATE SCHEMA fhir")
            owner.execute(
                "CREATE TABLE fhir.resource (resource_type text NOT NULL, id text NOT NULL, version integer NOT NULL "
                "DEFAULT 1, content jsonb NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (resource_type, id))"
            )
            owner.execute(f"GRANT USAGE ON SCHEMA fhir TO {role}")
            owner.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON fhir.resource TO {role}")

        async def write(copy: RoutedResource) -> str:
            async with await connect("site-x", f"{hospital_dsn}{role} password={password}", role) as connection:
                return await write_table_copy(connection, "fhir", "resource", copy)

        central_id = f"wb-{run}"
        with pytest.raises(WriteBackSetupError) as refused:
            asyncio.run(write(_copy(central_id, 1, "decision 1")))
        assert "cdrsync.writeback_deletion is missing" in str(refused.value) and role in str(refused.value)
        assert refused.value.error_class == "writeback_setup"

        with psycopg.connect(hospital_dsn + SETTINGS.pg_user, autocommit=True) as owner:  # what the README asks
            owner.execute(WRITEBACK_DELETION_DDL)
            owner.execute(f"GRANT USAGE ON SCHEMA cdrsync TO {role}")
            owner.execute(f"GRANT SELECT, INSERT, UPDATE ON cdrsync.writeback_deletion TO {role}")

        assert asyncio.run(write(_copy(central_id, 1, "decision 1"))) == "upserted"
        assert asyncio.run(write(_copy(central_id, 2, None))) == "deleted"
        assert asyncio.run(write(_copy(central_id, 1, "decision 1"))) == "superseded (deleted at version 2 there)"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            admin.execute(f"DROP ROLE IF EXISTS {role}")


def test_a_row_the_hospital_refuses_is_named_without_its_content(hospital: HospitalTable) -> None:
    """PostgreSQL's detail quotes the failing row (the decision itself): the dead letter's reason, logged and
    audited, carries the SQLSTATE and the primary message only."""
    with hospital.conn.cursor() as cursor:
        cursor.execute(
            f'ALTER TABLE {SCHEMA}."{hospital.table}" ADD CONSTRAINT no_refused '
            "CHECK (content->'code'->>'text' <> 'refused decision')"
        )
    copy = _copy(f"wb-{uuid.uuid4().hex[:12]}", 1, "refused decision")
    with pytest.raises(RefusedByHospitalError) as refused:
        hospital.write([copy])
    message = str(refused.value)
    assert "refused decision" not in message and "Failing row" not in message
    assert "SQLSTATE 23514" in message and "no_refused" in message and copy.target_id in message
    assert refused.value.error_class == "rejected_by_target"
    assert hospital.row(copy) is None
