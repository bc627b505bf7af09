"""Deterministic target ids: the same source resource always gets the same id at the target."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from typing import Any

__all__ = [
    "CDRSYNC_NAMESPACE",
    "CDRSYNC_REQUEST_PREFIX",
    "CDRSYNC_SOURCE_PREFIX",
    "ORIGIN_TAG_SYSTEM",
    "SERVER_META",
    "global_patient_key",
    "request_id",
    "shared_identifier",
    "target_id",
]

#: meta.tag system naming the site a resource came from: loop prevention, merging and provenance read it
ORIGIN_TAG_SYSTEM = "urn:cdrsync:origin-site"
#: meta.source of every version cdrsync writes, followed by the site it writes for (urn:cdrsync:site:site-a)
CDRSYNC_SOURCE_PREFIX = "urn:cdrsync:site:"
#: X-Request-ID of every request cdrsync sends to a FHIR server. HAPI stores a version's meta.source as the
#: source URI the client sent, then "#" and the request's id: an application that reads a resource cdrsync
#: wrote and writes it back whole keeps cdrsync's source URI, but its request id is its own (a HAPI-made id
#: is 16 letters and digits, never with a "-"), so this prefix tells cdrsync's versions from its edits.
CDRSYNC_REQUEST_PREFIX = "cdrsync-"
#: meta elements a FHIR server sets itself; never carried from one server to another
SERVER_META = ("versionId", "lastUpdated", "source")

# Fixed forever: changing it would give every resource a new id at every target.
CDRSYNC_NAMESPACE = uuid.UUID("6f1c4e3a-2b7d-5c8e-9a10-cd7e0b5a4f21")


def target_id(site: str, resource_type: str, source_id: str) -> str:
    """uuid5 over site, type and source id: stable across replays, distinct across sites."""
    # A separator that cannot occur in a site name or a FHIR type keeps ("a", "b|c") ≠ ("a|b", "c").
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, f"{site}|{resource_type}|{source_id}"))


def global_patient_key(system: str, value: str, secret: str | None = None) -> str:
    """The global patient key (and central Patient id) of a shared identifier; with a secret, keyed
    (HMAC-SHA256), so that the id does not give the number away to whoever tries every possible one."""
    name = f"patient|{system}|{value.strip()}"
    if secret is not None:
        name = "patient-hmac|" + hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()
    return str(uuid.uuid5(CDRSYNC_NAMESPACE, name))


def shared_identifier(resource: dict[str, Any], system: str, form: str = "as-written") -> str | None:
    """The value of the shared identifier in a Patient, in the form compared (IdentityConfig), None if it has
    none (or an empty one)."""
    for identifier in resource.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("system") == system:
            value = str(identifier.get("value") or "").strip()
            if form == "uppercase-no-spaces":
                value = "".join(value.split()).upper()
            if value:
                return value
    return None


def request_id() -> str:
    """An X-Request-ID for one request: cdrsync's prefix and 8 random hex digits (16 characters, as HAPI keeps)."""
    return f"{CDRSYNC_REQUEST_PREFIX}{secrets.token_hex(4)}"
