"""Reading the target FHIR server from outside: when each resource (version) was stored there.

The server's meta.lastUpdated is the time it stored a version; it runs on the same machine as the
benchmark, so it is compared with the benchmark's own wall clock.
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import orjson

__all__ = ["current", "get_json", "history", "last_updated", "parse_instant", "software_version"]


def get_json(url: str, timeout: float = 60) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/fhir+json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result: dict[str, Any] = orjson.loads(response.read())
        return result


def parse_instant(value: str) -> float:
    """A FHIR instant (e.g. 2026-11-21T10:00:00.123+00:00) as seconds since the epoch."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _pages(base: str, first: str) -> Iterable[dict[str, Any]]:
    url: str | None = first
    while url:
        page = get_json(url)
        yield page
        url = next((link["url"] for link in page.get("link", []) if link.get("relation") == "next"), None)


def current(base: str, refs: Iterable[str], chunk: int = 100, elements: str | None = None) -> dict[str, dict[str, Any]]:
    """The current version of each reference the server holds (absent ones are left out), read in batches."""
    by_type: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        kind, _, rid = ref.partition("/")
        by_type[kind].append(rid)
    found: dict[str, dict[str, Any]] = {}
    subset = f"&_elements={elements}" if elements else ""
    for kind, ids in by_type.items():
        for start in range(0, len(ids), chunk):
            url = f"{base}/{kind}?_id={','.join(ids[start : start + chunk])}&_count={chunk}{subset}"
            for page in _pages(base, url):
                for entry in page.get("entry", []):
                    resource = entry.get("resource") or {}
                    found[f"{kind}/{resource.get('id')}"] = resource
    return found


def last_updated(base: str, refs: Iterable[str]) -> dict[str, float]:
    """meta.lastUpdated of the current version of each reference the server holds."""
    stamps = {ref: (r.get("meta") or {}).get("lastUpdated") for ref, r in current(base, refs, elements="id").items()}
    return {ref: parse_instant(stamp) for ref, stamp in stamps.items() if stamp}


def history(base: str, ref: str) -> list[dict[str, Any]]:
    """Every stored version of one resource, oldest first."""
    versions = []
    for page in _pages(base, f"{base}/{ref}/_history?_count=500"):
        versions += [e["resource"] for e in page.get("entry", []) if "resource" in e]
    return sorted(versions, key=lambda r: int((r.get("meta") or {}).get("versionId", 0)))


def software_version(base: str) -> str:
    """The server's software name and version from its capability statement."""
    statement = get_json(f"{base}/metadata?_elements=software,fhirVersion")
    software = statement.get("software") or {}
    return f"{software.get('name', '?')} {software.get('version', '?')} (FHIR {statement.get('fhirVersion', '?')})"
