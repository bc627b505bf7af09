"""FHIR definitions shipped with cdrsync (fhir/*.json, e.g. the tumour-board decision Questionnaire)."""

from __future__ import annotations

from pathlib import Path

import orjson

from .config import TargetEndpoint
from .fhirclient import FhirClient

__all__ = ["apply_definitions", "definition_files"]


def definition_files(directory: Path) -> list[Path]:
    """The definition resources, in name order."""
    return sorted(directory.glob("*.json"))


async def apply_definitions(endpoint: TargetEndpoint, directory: Path) -> list[str]:
    """PUT each definition at its own id (update-as-create: applying twice changes nothing but the version)."""
    done = []
    async with FhirClient(endpoint) as client:
        for path in definition_files(directory):
            resource = orjson.loads(path.read_bytes())
            outcome = await client.put(resource["resourceType"], resource["id"], orjson.dumps(resource))
            done.append(f"{resource['resourceType']}/{resource['id']} ({path.name}): status {outcome.status}")
    return done
