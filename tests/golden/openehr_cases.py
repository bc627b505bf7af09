"""The openEHR golden cases: every shared example composition, mapped with fixed source metadata.

Regenerate (then review every diff clinically before committing):  .venv/bin/python -m tests.golden.openehr_cases
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from pipeline.adapters.openehr import CompositionSource, composition_to_resources

ROOT = Path(__file__).resolve().parent.parent.parent
# Every composition of ../shared/data/openehr/compositions/, copied unchanged (see its NOTICE.md) so a
# fresh clone tests without the shared folder.
COMPOSITIONS = ROOT / "tests" / "fixtures" / "openehr"
GOLDEN = Path(__file__).resolve().parent / "openehr"
TZ = ZoneInfo("Europe/Berlin")
IDENTIFIER_SYSTEMS = {"kvid-10": "http://fhir.de/sid/gkv/kvid-10"}


def source_for(name: str) -> CompositionSource:
    """Fixed row metadata for a sample (the samples' own uids are partly placeholders)."""
    return CompositionSource(
        uid=f"golden-{name}",
        system_id="site-b.example",
        version=1,
        ehr_id="7d44b88c-4199-4bad-97dc-d78268e01398",
        subject_id="A123456789",
        subject_namespace="kvid-10",
    )


def mapped_case(path: Path) -> dict[str, Any]:
    """What a sample composition maps to, as the golden file stores it."""
    mapped = composition_to_resources(orjson.loads(path.read_bytes()), source_for(path.stem), TZ, IDENTIFIER_SYSTEMS)
    return {
        "patient": mapped.patient,
        "resources": mapped.resources,
        "unmapped": [{"archetype_id": u.archetype_id, "path": u.path} for u in mapped.unmapped],
    }


def samples() -> list[Path]:
    """Every shared example composition."""
    return sorted(COMPOSITIONS.glob("*.json"))


if __name__ == "__main__":
    for sample in samples():
        out = GOLDEN / f"{sample.stem}.json"
        out.write_bytes(orjson.dumps(mapped_case(sample), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
        print("wrote", out.relative_to(ROOT))
