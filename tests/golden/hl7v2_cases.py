"""The HL7 v2 golden cases: every shared example message, mapped for a demo site.

Regenerate (then review every diff clinically before committing):  .venv/bin/python -m tests.golden.hl7v2_cases
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from pipeline.adapters.hl7v2 import Hl7Context, message_to_resources
from pipeline.errors import MappingError

ROOT = Path(__file__).resolve().parent.parent.parent
# Every message of ../shared/data/hl7v2/messages/ and the peer's conversions (expected-fhir/), copied
# unchanged (see the NOTICE.md files) so a fresh clone tests without the shared folder.
MESSAGES = ROOT / "tests" / "fixtures" / "hl7v2"
PEER = ROOT / "tests" / "fixtures" / "fhir-converter"
GOLDEN = Path(__file__).resolve().parent / "hl7v2"
CTX = Hl7Context(
    site="site-c",
    tz=ZoneInfo("Europe/Berlin"),
    identifier_systems={"test1": "urn:oid:2.16.1", "USSSA": "http://hl7.org/fhir/sid/us-ssn"},
)


def read_message(path: Path) -> str:
    """The raw message bytes as text (never universal-newline translated)."""
    return path.read_bytes().decode("utf-8")


def mapped_case(path: Path) -> dict[str, Any]:
    """What a sample message maps to, as the golden file stores it (a rejected message keeps its reason)."""
    try:
        mapped = message_to_resources(read_message(path), CTX)
    except MappingError as error:
        return {"rejected": str(error)}
    return {"message_type": mapped.message_type, "resources": mapped.resources, "problems": mapped.problems}


def samples() -> list[Path]:
    """Every shared example message."""
    return sorted(MESSAGES.glob("*.hl7"))


if __name__ == "__main__":
    for sample in samples():
        out = GOLDEN / f"{sample.stem}.json"
        out.write_bytes(orjson.dumps(mapped_case(sample), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        print("wrote", out.relative_to(ROOT))
