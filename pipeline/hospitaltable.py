"""A hospital's copy of a central decision written into its own source table (writeback.method source-table).

The guard, as for a FHIR write-back (backflow.write_fhir_copy): a late or replayed record never takes a
hospital's copy back in time. Each row carries the central version it was made from (meta.tag
urn:cdrsync:source-version, the highest one counts), and the SQL refuses an older version over a newer one.

A deletion leaves no row to compare with, so it leaves a mark instead: `cdrsync.writeback_deletion` in the
hospital's database holds, per table and resource, the highest central version deleted there, written in
the deletion's transaction. An upsert made from that version or an older one is refused ("superseded");
one made from a newer version (central decided again) is written. The marks stay: one short row per
deleted copy. The table is cdrsync's own, outside the tables Debezium captures (its connectors list theirs).
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from .backflow import SOURCE_VERSION_TAG_SYSTEM
from .errors import PermanentError, TargetUnavailableError
from .records import RoutedResource

__all__ = ["WRITEBACK_DELETION_DDL", "RefusedByHospitalError", "WriteBackSetupError", "connect", "write_table_copy"]

WRITEBACK_DELETION_DDL = """
CREATE SCHEMA IF NOT EXISTS cdrsync;
CREATE TABLE IF NOT EXISTS cdrsync.writeback_deletion (
  source_table   text        NOT NULL,
  resource_type  text        NOT NULL,
  id             text        NOT NULL,
  source_version bigint      NOT NULL,
  deleted_at     timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (source_table, resource_type, id)
);
"""


class RefusedByHospitalError(PermanentError):
    """The hospital's database refused the row (a constraint, a type): named by its SQLSTATE and primary
    message only, since PostgreSQL's detail quotes the row."""

    error_class = "rejected_by_target"


class WriteBackSetupError(PermanentError):
    """The hospital's database answers, but cdrsync's table of deletion marks is not there and cannot be made."""

    error_class = "writeback_setup"


async def connect(site: str, dsn: str, user: str) -> psycopg.AsyncConnection[Any]:
    """A connection to a hospital's database for write-back (autocommit), its deletion marks' table ready.

    The table is created when missing (two workers at once: one of them does). When it is there, nothing is
    created, so a database user with rights on the table alone will do. Raises TargetUnavailableError while
    the database cannot be reached, WriteBackSetupError when the table is missing and the user may not make it.
    """
    try:
        connection = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise TargetUnavailableError(f"{site} database: {type(exc).__name__}") from None
    try:
        async with connection.cursor() as cursor:
            await cursor.execute("SELECT to_regclass('cdrsync.writeback_deletion') IS NOT NULL")
            row = await cursor.fetchone()
            if not (row and row[0]):
                await cursor.execute(WRITEBACK_DELETION_DDL)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject, psycopg.errors.DuplicateTable):
        pass  # created meanwhile by another worker
    except psycopg.OperationalError as exc:
        await connection.close()
        raise TargetUnavailableError(f"{site} database: {type(exc).__name__}") from None
    except psycopg.Error as exc:
        await connection.close()
        raise WriteBackSetupError(
            f"{site}: table cdrsync.writeback_deletion is missing and {user} cannot create it "
            f"({type(exc).__name__}: {str(exc).strip()}); create it (pipeline/hospitaltable.py, "
            f"WRITEBACK_DELETION_DDL) and grant {user} SELECT, INSERT, UPDATE on it, or grant {user} CREATE"
        ) from None
    return connection


def _version_of(column: sql.Composable) -> sql.Composed:
    """SQL: the central version a row's content was written from (its highest source-version tag, as
    backflow.written_version), -1 without one."""
    return sql.SQL(
        "COALESCE((SELECT MAX((t->>'code')::bigint) FROM jsonb_array_elements("
        "CASE WHEN jsonb_typeof({c}->'meta'->'tag') = 'array' THEN {c}->'meta'->'tag' ELSE '[]'::jsonb END) t "
        "WHERE t->>'system' = {system} AND t->>'code' ~ '^[0-9]{{1,18}}$'), -1)"
    ).format(c=column, system=sql.Literal(SOURCE_VERSION_TAG_SYSTEM))


async def write_table_copy(
    connection: psycopg.AsyncConnection[Any], schema: str, table: str, record: RoutedResource
) -> str:
    """Upsert (or delete) the hospital's row, in one transaction. An unchanged row is not rewritten; a row
    written from a newer central version than the record's, or deleted at one, is left as it is.

    Returns what happened, for the audit: upserted, unchanged, deleted, absent, superseded (version N
    there) or superseded (deleted at version N there). The connection is one from connect(). An
    OperationalError (the hospital is down) is the caller's; any other refusal raises RefusedByHospitalError.
    """
    try:
        return await _write(connection, schema, table, record)
    except psycopg.OperationalError:
        raise
    except psycopg.Error as exc:
        primary = exc.diag.message_primary or type(exc).__name__
        raise RefusedByHospitalError(
            f"{record.target_ref} refused by {schema}.{table} at {record.target} (SQLSTATE {exc.sqlstate}): {primary}"
        ) from None


async def _write(connection: psycopg.AsyncConnection[Any], schema: str, table: str, record: RoutedResource) -> str:
    target = sql.Identifier(schema, table)
    marks = (f"{schema}.{table}", record.resource_type, record.target_id)
    key = (record.resource_type, record.target_id)
    async with connection.transaction(), connection.cursor() as cursor:
        if record.is_delete:
            await cursor.execute(
                sql.SQL(
                    "DELETE FROM {t} WHERE resource_type = %s AND id = %s AND (%s::bigint IS NULL OR {v} <= %s)"
                ).format(t=target, v=_version_of(sql.Identifier("content"))),
                (*key, record.source_version, record.source_version),
            )
            done = "deleted" if cursor.rowcount else None
        else:
            await cursor.execute(
                sql.SQL(
                    "WITH n AS (SELECT %s::jsonb AS content) "
                    "INSERT INTO {t} AS r (resource_type, id, version, content) SELECT %s, %s, 1, n.content FROM n "
                    "WHERE {new} < 0 OR NOT EXISTS (SELECT 1 FROM cdrsync.writeback_deletion d "
                    "WHERE (d.source_table, d.resource_type, d.id) = (%s, %s, %s) AND d.source_version >= {new}) "
                    "ON CONFLICT (resource_type, id) DO UPDATE SET content = EXCLUDED.content, "
                    "version = r.version + 1, updated_at = now() WHERE r.content IS DISTINCT FROM EXCLUDED.content "
                    "AND ({excluded} < 0 OR {old} <= {excluded})"
                ).format(
                    t=target,
                    new=_version_of(sql.SQL("n.content")),
                    excluded=_version_of(sql.SQL("EXCLUDED.content")),
                    old=_version_of(sql.SQL("r.content")),
                ),
                (record.resource, *key, *marks),
            )
            done = "upserted" if cursor.rowcount else None
        await cursor.execute(
            sql.SQL("SELECT {v} FROM {t} WHERE resource_type = %s AND id = %s").format(
                t=target, v=_version_of(sql.Identifier("content"))
            ),
            key,
        )
        row = await cursor.fetchone()
        if record.is_delete and row is None and record.source_version is not None:
            # Deleted now, or already absent (a deletion read before its upsert): either way marked, so that
            # an older version's upsert arriving later is refused.
            await cursor.execute(
                "INSERT INTO cdrsync.writeback_deletion AS d (source_table, resource_type, id, source_version) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (source_table, resource_type, id) DO UPDATE SET "
                "source_version = GREATEST(d.source_version, EXCLUDED.source_version), deleted_at = now()",
                (*marks, record.source_version),
            )
        if done is not None:
            return done
        if row is None and not record.is_delete:
            await cursor.execute(
                "SELECT source_version FROM cdrsync.writeback_deletion "
                "WHERE (source_table, resource_type, id) = (%s, %s, %s)",
                marks,
            )
            mark = await cursor.fetchone()
            if mark is not None:
                return f"superseded (deleted at version {mark[0]} there)"
    if row is None:
        return "absent" if record.is_delete else "unchanged"  # (an upsert that wrote nothing found its row)
    if record.source_version is not None and row[0] > record.source_version:
        return f"superseded (version {row[0]} there)"
    return "unchanged"
