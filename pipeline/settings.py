"""Deployment settings: from the environment (prefix CDRSYNC_), with defaults for the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from psycopg.conninfo import make_conninfo
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where things are and how hard to try. Secrets never have defaults here."""

    model_config = SettingsConfigDict(env_prefix="CDRSYNC_", frozen=True, extra="ignore")

    config_root: Path = Field(default=_REPO_ROOT, description="directory holding topics.yaml and sites/")
    kafka_bootstrap: str = Field(default="localhost:9092", validation_alias="KAFKA_BOOTSTRAP")
    connect_url: str = Field(default="http://localhost:8083", validation_alias="CONNECT_URL")
    state_dir: Path = Field(default=_REPO_ROOT / ".stack" / "worker", description="RocksDB tables")
    web_port: int = 6066
    sink_attempts: int = Field(default=5, ge=1, description="in-process write attempts before a retry topic")
    writeback_hold_seconds: float = Field(
        default=600,
        gt=0,
        description="how long write-back holds a record for a hospital it cannot reach before the dead letters",
    )
    writeback_lane_records: int = Field(
        default=1000,
        ge=1,
        description="records read for one hospital ahead of what was written there; the others go on meanwhile",
    )
    stage_batch_max: int = Field(
        default=500, ge=1, description="records normalize, identity and order each take at once (outputs sent together)"
    )
    stage_batch_seconds: float = Field(
        default=0.005, gt=0, le=5, description="how long those stages wait, at most, to fill a batch"
    )
    sink_batch_max: int = Field(
        default=200, ge=1, description="ready records the sink takes at once (1: one at a time, no batching)"
    )
    sink_batch_seconds: float = Field(
        default=0.005, gt=0, le=5, description="how long the sink waits, at most, to fill a batch"
    )
    batch_close_early: bool = Field(
        default=True,
        description="a stage's batch closes as soon as no further record is waiting (false: it waits its seconds out)",
    )
    sink_in_flight: int = Field(default=8, ge=1, description="patients whose writes the sink has in flight at once")
    sink_bundle_max: int = Field(
        default=1,
        ge=1,
        description="one patient's upserts sent as one transaction bundle, at most (1: no bundles, each resource its"
        " own PUT; measured faster against a server next to the worker, see README Performance)",
    )
    producer_linger_ms: float = Field(
        default=5.0, ge=0, le=1000, description="how long a worker's producer gathers records into one request"
    )
    fetch_max_wait_ms: int = Field(
        default=50, ge=1, le=1500, description="how long the broker may hold a worker's fetch when nothing is new"
    )
    rocksdb_cache_mib: int = Field(
        default=16, ge=1, description="one RocksDB block cache for all of a worker's tables, memtables charged to it"
    )
    rocksdb_write_buffer_mib: int = Field(
        default=8, ge=1, description="memtables of all of a worker's tables together, at most (part of the cache)"
    )
    memory_trim_seconds: float = Field(
        default=10.0, ge=0, description="how often a worker gives memory it freed back to the system (0: never)"
    )
    memory_mmap_threshold_kib: int = Field(
        default=128,
        ge=0,
        description="a worker's allocations this large get their own mapping, returned when freed (0: glibc's own)",
    )
    max_record_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="source records larger than this are dead-lettered (oversize)"
    )
    stall_seconds: int = Field(
        default=120,
        ge=30,
        description="a partition with waiting records that stands still this long restarts the worker",
    )
    topic_wait_seconds: int = Field(
        default=60,
        ge=0,
        description="how long a starting worker waits for the broker to list the topics it subscribes to",
    )
    park_limit_seconds: int = Field(default=3600, ge=1, description="how long a resource waits for a reference")
    await_write_seconds: int = Field(
        default=86400,
        ge=0,
        description="how long a write that waits for another one (a delete after an identity move, for the write"
        " the previous Patient's sink owes; a move, for the Patient now named to hold the patient) goes round the"
        " last retry tier before it becomes a dead letter",
    )
    app_id: str = Field(default="cdrsync", description="Faust app id: the workers' Kafka consumer group")
    group_instance_id: str = Field(
        default="",
        description="a worker's static member name in its consumer group, unique to it and the same across its"
        " restarts (empty: a dynamic member)",
    )
    log_format: Literal["json", "text"] = Field(default="json", description="worker logs: JSON lines or text")
    monitor_port: int = Field(default=6067, description="port of `cdrsync monitor`'s /metrics")
    monitor_volumes: str = Field(default="", description="name=path,... file systems `cdrsync monitor` reports")

    pg_host: str = Field(default="localhost", validation_alias="PG_HOST")
    pg_port: int = Field(default=55432, validation_alias="PG_PORT")
    pg_user: str = Field(default="postgres", validation_alias="PG_SUPERUSER")
    pg_password: SecretStr | None = Field(default=None, validation_alias="PG_PASSWORD")
    audit_database: str = Field(default="central", description="PostgreSQL database of the audit.event table")
    audit_batch_seconds: float = Field(
        default=0.1,
        ge=0,
        le=10,
        description="how long the audit store gathers events into one insert after the first arrives (0: only those"
        " already fetched)",
    )

    @property
    def pg_password_value(self) -> str | None:
        """The database password, if one is set (demo and test tooling only)."""
        return self.pg_password.get_secret_value() if self.pg_password else None

    def pg_dsn(self, dbname: str, *, host: str | None = None, port: int | None = None, **options: str | int) -> str:
        """libpq connection string for a database of PG_HOST:PG_PORT (or host, port), as PG_SUPERUSER with
        PG_PASSWORD, every value quoted as libpq needs (a password with a space or a quote stays whole and
        never shows up in a parse error)."""
        return pg_dsn(
            self.pg_host if host is None else host,
            self.pg_port if port is None else port,
            self.pg_user,
            dbname,
            self.pg_password_value,
            **options,
        )


def pg_dsn(host: str, port: int, user: str, dbname: str, password: str | None, **options: str | int) -> str:
    """libpq connection string, each value quoted (psycopg's make_conninfo)."""
    values: dict[str, str | int] = {"host": host, "port": port, "user": user, "dbname": dbname, **options}
    if password:
        values["password"] = password
    return make_conninfo("", **values)
