"""Structured logs: one JSON object per line, with correlation fields and no patient data.

A log call passes its correlation fields as `extra` (see `pipeline.observe.record_fields`); only the
names in CORRELATION_FIELDS are written, so an unexpected `extra` cannot leak content. Messages are
written as given, after one scrub: validation errors quote the offending input (`input_value=...`), and
so do FHIR server diagnostics in cdrsync's own messages (`"..."`); it may be a name or a birth date, so those
quotes are cut. Tracebacks keep their file names.
"""

from __future__ import annotations

import logging
import re
import traceback
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["CORRELATION_FIELDS", "JsonLinesFormatter", "TextFormatter", "configure", "logging_config", "scrub"]

CORRELATION_FIELDS = (
    "stage",
    "site",
    "target",
    "resource_type",
    "op",
    "source_topic",
    "source_partition",
    "source_offset",
    "source_lsn",
    "target_ref",
    "status",
    "version_id",
    "attempts",
    "error_class",
    "tier",
)
_INPUT_VALUE = re.compile(r"input_value=(?:'[^']*'|\"[^\"]*\"|\{.*?\}|\[.*?\]|[^,\]\s]+)")
_DOUBLE_QUOTED = re.compile(r'"[^"\n]{1,500}"')


def scrub(text: str, *, quoted: bool = False) -> str:
    """Cut the values a message quotes from its input: pydantic's `input_value=...` always; with quoted, also
    anything in double quotes (a FHIR server's diagnostics quote the offending value, e.g. a name)."""
    text = _INPUT_VALUE.sub("input_value=<redacted>", text)
    return _DOUBLE_QUOTED.sub('"<redacted>"', text) if quoted else text


class JsonLinesFormatter(logging.Formatter):
    """Format a record as one JSON object: ts, level, logger, msg, correlation fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            # Our own messages may carry a target's diagnostics; a library's quotes are names of its own things.
            "msg": scrub(record.getMessage(), quoted=record.name.startswith("cdrsync")),
        }
        for name in CORRELATION_FIELDS:
            value = record.__dict__.get(name)
            if value is not None and value != "":
                entry[name] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = scrub("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """Plain text lines, scrubbed as the JSON lines are: `[time] [level] logger: message`."""

    def __init__(self) -> None:
        super().__init__("[%(asctime)s] [%(levelname)s] %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        scrubbed = logging.makeLogRecord(record.__dict__)  # the record itself goes on to other handlers as it is
        scrubbed.message = scrub(record.message, quoted=record.name.startswith("cdrsync"))
        return super().formatMessage(scrubbed)

    def formatException(self, ei: Any) -> str:
        return scrub(super().formatException(ei))


def logging_config(log_format: str) -> dict[str, Any]:
    """A logging dictConfig for Faust's worker, merged into its own (keeping its level): JSON lines or text,
    both scrubbed."""
    formatter = "json" if log_format == "json" else "text"
    return {
        "version": 1,
        "merge": True,
        "formatters": {
            formatter: {"()": f"{__name__}.{'JsonLinesFormatter' if formatter == 'json' else 'TextFormatter'}"}
        },
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": formatter, "stream": "ext://sys.stdout"}
        },
    }


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Log to standard output as JSON lines (or text) in a process that is not a Faust worker."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLinesFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
