"""What every openEHR entry mapper needs to know about the composition it came from."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from ...ids import CDRSYNC_NAMESPACE

__all__ = ["COMPOSITION_SYSTEM", "ENTRY_SYSTEM", "Context", "entry_source_id"]

# Identifier systems linking a mapped resource to its composition version and to the entry it came from.
COMPOSITION_SYSTEM = "urn:cdrsync:openehr:composition-version"
ENTRY_SYSTEM = "urn:cdrsync:openehr:entry"


def entry_source_id(composition_uid: str, path: str) -> str:
    """Deterministic source id of what a composition's entry at `path` becomes, the same in every version.

    A uuid5 (36 characters) fits FHIR's id rule (64 chars, [A-Za-z0-9.-]); the readable uid + path is
    kept in the resource's ENTRY_SYSTEM identifier.
    """
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, f"openehr|{composition_uid}|{path}"))


@dataclass(frozen=True)
class Context:
    """The composition's identity, its patient and encounter, and the site's time zone."""

    composition_uid: str  # the versioned object's uid, without ::system::version
    version_uid: str  # the full OBJECT_VERSION_ID: uid::system::version
    patient_ref: str
    encounter_ref: str | None
    tz: ZoneInfo
    start_time: str | None  # the composition context's start time, as a FHIR dateTime
    persistent: bool = False  # COMPOSITION.category 431 (persistent, e.g. a problem list) rather than 433 (event)

    def resource(self, resource_type: str, path: str, **elements: Any) -> dict[str, Any]:
        """A resource with its deterministic id and its links back to the composition and entry."""
        identifiers = [
            {"system": ENTRY_SYSTEM, "value": f"{self.composition_uid}{path}"},
            {"system": COMPOSITION_SYSTEM, "value": self.version_uid},
        ]
        body: dict[str, Any] = {
            "resourceType": resource_type,
            "id": entry_source_id(self.composition_uid, path),
            "identifier": identifiers,
        }
        body.update({key: value for key, value in elements.items() if value not in (None, [], {})})
        return body

    @property
    def subject(self) -> dict[str, str]:
        """The Reference to the composition's patient."""
        return {"reference": self.patient_ref}

    @property
    def encounter(self) -> dict[str, str] | None:
        """The Reference to the composition's Encounter, if it has one."""
        return {"reference": self.encounter_ref} if self.encounter_ref else None
