"""Structured logs: JSON lines, correlation fields, no patient data."""

from __future__ import annotations

import logging
import sys

import orjson
import pytest

from pipeline.logs import JsonLinesFormatter, TextFormatter, logging_config, scrub

pytestmark = pytest.mark.unit


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("cdrsync.stages", logging.INFO, __file__, 1, message, args, None)
    record.__dict__.update(extra)
    return record


def test_one_json_object_per_line_with_correlation_fields() -> None:
    line = JsonLinesFormatter().format(
        _record(
            "wrote %s %s",
            "UPDATE",
            "Observation/0f7c",
            site="site-a",
            target="central",
            source_topic="cdc.site-a.fhir.resource",
            source_partition=1,
            source_offset=17,
            source_lsn=123456,
            target_ref="Observation/0f7c",
            status=200,
        )
    )
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["msg"] == "wrote UPDATE Observation/0f7c"
    assert entry["level"] == "info" and entry["logger"] == "cdrsync.stages"
    assert entry["ts"].endswith("+00:00")
    assert {k: entry[k] for k in ("source_topic", "source_partition", "source_offset", "source_lsn")} == {
        "source_topic": "cdc.site-a.fhir.resource",
        "source_partition": 1,
        "source_offset": 17,
        "source_lsn": 123456,
    }
    assert entry["target_ref"] == "Observation/0f7c"


def test_fields_outside_the_correlation_list_are_not_written() -> None:
    entry = orjson.loads(
        JsonLinesFormatter().format(_record("x", resource='{"name":[{"family":"Doe"}]}', birth_date="1970-01-01"))
    )
    assert "resource" not in entry and "birth_date" not in entry
    assert "Doe" not in orjson.dumps(entry).decode()


def test_validation_input_values_are_cut_from_messages_and_tracebacks() -> None:
    message = "birthDate: Input should be a valid date [type=date_from_datetime_parsing, input_value='1970-13-45', "
    assert "1970" not in scrub(message)
    assert "input_value=<redacted>" in scrub(message)
    try:
        raise ValueError("name: [type=string_type, input_value={'family': 'Doe'}, input_type=dict]")
    except ValueError:
        record = logging.LogRecord("cdrsync", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = orjson.loads(JsonLinesFormatter().format(record))
    assert entry["exc_type"] == "ValueError"
    assert "Doe" not in entry["exc"] and "input_value=<redacted>" in entry["exc"]
    assert f'File "{__file__}"' in entry["exc"]


def test_values_a_fhir_server_quotes_are_cut_but_the_message_stays() -> None:
    diagnostics = 'rejected (400): HAPI-1821: Invalid attribute value "Doe, Jane": birthDate "1970-13-45"'
    assert scrub(diagnostics, quoted=True) == (
        'rejected (400): HAPI-1821: Invalid attribute value "<redacted>": birthDate "<redacted>"'
    )
    ours = JsonLinesFormatter().format(
        logging.LogRecord("cdrsync.routing", logging.ERROR, "", 1, diagnostics, (), None)
    )
    assert "Doe" not in ours and "1970" not in ours
    faust = logging.LogRecord("faust.agents", logging.ERROR, "", 1, 'Crashed reason=Mismatch("topic t")', (), None)
    assert orjson.loads(JsonLinesFormatter().format(faust))["msg"] == 'Crashed reason=Mismatch("topic t")'


def test_faust_gets_a_merged_config_for_json_and_for_text() -> None:
    config = logging_config("json")
    assert config["merge"] is True and config["handlers"]["default"]["formatter"] == "json"
    assert config["formatters"]["json"]["()"] == "pipeline.logs.JsonLinesFormatter"
    text = logging_config("text")
    assert text["merge"] is True and text["formatters"]["text"]["()"] == "pipeline.logs.TextFormatter"


def test_text_logs_are_scrubbed_like_json_lines() -> None:
    diagnostics = 'rejected (400): HAPI-1821: Invalid attribute value "Doe, Jane": birthDate "1970-13-45"'
    line = TextFormatter().format(
        logging.LogRecord("cdrsync.routing", logging.ERROR, "", 1, "%s", (diagnostics,), None)
    )
    assert "Doe" not in line and "1970" not in line and 'value "<redacted>"' in line and "cdrsync.routing" in line
    try:
        raise ValueError("name: [type=string_type, input_value={'family': 'Doe'}, input_type=dict]")
    except ValueError:
        record = logging.LogRecord("cdrsync", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = TextFormatter().format(record)
    assert "Doe" not in line and "input_value=<redacted>" in line and "Traceback" in line
    faust = logging.LogRecord("faust.agents", logging.ERROR, "", 1, 'Crashed reason=Mismatch("topic t")', (), None)
    assert TextFormatter().format(faust).endswith('faust.agents: Crashed reason=Mismatch("topic t")')
