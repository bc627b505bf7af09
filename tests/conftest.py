"""Shared fixtures: the project's configuration and real example resources."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.config import Config, load_config
from pipeline.demo import FIXTURES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def config() -> Config:
    return load_config(ROOT)


def bundle_resources(name: str) -> list[dict[str, Any]]:
    """Every resource of one of the FHIR-Converter sample bundles."""
    return [e["resource"] for e in orjson.loads((FIXTURES / f"{name}.json").read_bytes())["entry"]]


def first_of(name: str, resource_type: str) -> dict[str, Any]:
    """The first resource of a type in a sample bundle."""
    return next(r for r in bundle_resources(name) if r["resourceType"] == resource_type)


def debezium_value(
    op: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    *,
    lsn: int = 24023928,
    ts_ms: int = 1700000000000,
) -> bytes:
    """A Debezium PostgreSQL change event as the JSON converter (schemas disabled) writes it."""
    return orjson.dumps(
        {
            "before": before,
            "after": after,
            "source": {
                "version": "3.1.2.Final",
                "connector": "postgresql",
                "name": "cdc.site-a",
                "ts_ms": ts_ms,
                "snapshot": "true" if op == "r" else "false",
                "db": "site_a",
                "sequence": '[null,"24023928"]',
                "schema": "fhir",
                "table": "resource",
                "txId": 771,
                "lsn": lsn,
                "xmin": None,
            },
            "transaction": None,
            "op": op,
            "ts_ms": ts_ms + 35,
        }
    )


def row(resource: dict[str, Any], version: int = 1) -> dict[str, Any]:
    """A fhir.resource row as Debezium sends it (jsonb content arrives as a JSON string)."""
    return {
        "resource_type": resource["resourceType"],
        "id": resource["id"],
        "version": version,
        "content": orjson.dumps(resource).decode(),
        "updated_at": "2026-11-21T04:30:30.123456Z",
    }
