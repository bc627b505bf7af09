"""Stage 2: a normalized resource → one RoutedResource per route, in target ids, keyed by patient.

Until the shared-identifier resolution lands (issue 3) the patient key is the target id of the
site's own Patient, so one patient's records share a partition and nothing races on them.
"""

from __future__ import annotations

from typing import Any

import orjson

from .config import Route, SiteConfig
from .ids import target_id
from .records import NormalizedResource, RoutedResource, canonical_hash
from .references import logical_system, rewrite_references

__all__ = ["ORIGIN_TAG_SYSTEM", "route_resource", "to_target_form"]

# meta.tag naming the site a resource came from: loop prevention and provenance read it.
ORIGIN_TAG_SYSTEM = "urn:cdrsync:origin-site"
_SERVER_META = ("versionId", "lastUpdated", "source")


def _carried(site: SiteConfig, route: Route) -> frozenset[str]:
    return frozenset(route.resource_types or site.resource_types)


def _with_source_identifier(resource: dict[str, Any], site: str, source_id: str) -> dict[str, Any]:
    """Keep the source id as an identifier (QuestionnaireResponse.identifier is 0..1, the rest 0..*)."""
    own = {"system": logical_system(site, resource["resourceType"]), "value": source_id}
    current = resource.get("identifier")
    if resource["resourceType"] == "QuestionnaireResponse":
        return resource if current else {**resource, "identifier": own}
    identifiers = list(current or [])
    if not any(i.get("system") == own["system"] for i in identifiers if isinstance(i, dict)):
        identifiers.append(own)
    return {**resource, "identifier": identifiers}


def _with_origin_meta(resource: dict[str, Any], site: str) -> dict[str, Any]:
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in _SERVER_META}
    tags = [t for t in meta.get("tag", []) if t.get("system") != ORIGIN_TAG_SYSTEM]
    meta["tag"] = [*tags, {"system": ORIGIN_TAG_SYSTEM, "code": site}]
    meta["source"] = f"urn:cdrsync:site:{site}"
    return {**resource, "meta": meta}


def to_target_form(
    resource: dict[str, Any], site: str, carried: frozenset[str]
) -> tuple[dict[str, Any], frozenset[str]]:
    """The resource as the target stores it, and the target references it depends on."""
    source_id = resource["id"]
    rewritten = rewrite_references(resource, site, carried, lambda t, i: target_id(site, t, i))
    body = _with_origin_meta(_with_source_identifier(rewritten.resource, site, source_id), site)
    body["id"] = target_id(site, resource["resourceType"], source_id)
    return body, rewritten.dependencies


def route_resource(record: NormalizedResource, site: SiteConfig) -> list[RoutedResource]:
    """One RoutedResource per route of the site that carries the record's type."""
    routed = []
    for route in site.routes:
        carried = _carried(site, route)
        if record.resource_type not in carried:
            continue
        body, dependencies = None, frozenset[str]()
        if record.resource is not None:
            form, dependencies = to_target_form(orjson.loads(record.resource), site.site, carried)
            body = orjson.dumps(form).decode()
        patient_source = (record.patient_ref or "").removeprefix("Patient/")
        patient_key = (
            target_id(site.site, "Patient", patient_source)
            if patient_source
            else target_id(site.site, record.resource_type, record.source_id)
        )
        routed.append(
            RoutedResource(
                site=site.site,
                target=route.target,
                resource_type=record.resource_type,
                source_id=record.source_id,
                target_id=target_id(site.site, record.resource_type, record.source_id),
                patient_key=patient_key,
                op=record.op,
                resource=body,
                content_hash=canonical_hash(orjson.loads(body)) if body else None,
                dependencies=sorted(dependencies),
                source_version=record.source_version,
                source_lsn=record.source_lsn,
                source_commit_ms=record.source_commit_ms,
                captured_ms=record.captured_ms,
                origin_topic=record.origin_topic,
                origin_partition=record.origin_partition,
                origin_offset=record.origin_offset,
            )
        )
    return routed
