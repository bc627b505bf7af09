"""Database connection strings built from the environment."""

from __future__ import annotations

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pipeline.settings import Settings

pytestmark = pytest.mark.unit


def test_a_password_with_spaces_and_quotes_stays_whole_and_out_of_parse_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PG_PASSWORD", "correct horse 'battery' staple")
    monkeypatch.setenv("PG_HOST", "db.hospital.example")
    dsn = Settings().pg_dsn("site_a", port=6543, connect_timeout=10)
    assert conninfo_to_dict(dsn) == {
        "host": "db.hospital.example",
        "port": "6543",
        "user": "postgres",
        "dbname": "site_a",
        "connect_timeout": "10",
        "password": "correct horse 'battery' staple",
    }
    # Pasted in unquoted, the same password broke the string, and the error quoted part of it.
    with pytest.raises(psycopg.ProgrammingError) as broken:
        conninfo_to_dict("host=h dbname=d password=correct horse 'battery' staple")
    assert "horse" in str(broken.value)


def test_no_password_means_none_in_the_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PG_PASSWORD", raising=False)
    assert "password" not in conninfo_to_dict(Settings().pg_dsn("central"))
