"""Reference rewriting: source-local references become target references or logical references."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["RewriteResult", "logical_system", "map_references", "relative_reference", "rewrite_references"]

# A relative literal reference: Type/id, optionally with a version (FHIR R4 3.1.1.2, Reference.reference).
_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


def relative_reference(reference: str) -> tuple[str, str] | None:
    """(type, id) of a relative literal reference (a version suffix left out); None for any other form."""
    match = _RELATIVE.match(reference)
    return (match.group(1), match.group(2)) if match else None


def logical_system(site: str, resource_type: str) -> str:
    """Identifier system naming a site's local ids of one resource type."""
    return f"urn:cdrsync:{site}:{resource_type}"


class RewriteResult:
    """The rewritten resource and the target references it depends on."""

    __slots__ = ("dependencies", "resource")

    def __init__(self, resource: dict[str, Any], dependencies: frozenset[str]) -> None:
        self.resource = resource
        self.dependencies = dependencies


def _logical(site: str, ref: dict[str, Any], reference: str) -> dict[str, Any]:
    """A reference the target cannot resolve, kept as an identifier so nothing is lost."""
    match = _RELATIVE.match(reference)
    out = {k: v for k, v in ref.items() if k != "reference"}
    if match:
        out.setdefault("type", match.group(1))
        out["identifier"] = {"system": logical_system(site, match.group(1)), "value": match.group(2)}
    else:  # urn:uuid:…, absolute URL of another server
        out["identifier"] = {"system": "urn:ietf:rfc:3986", "value": reference}
    return out


def map_references(node: Any, replace: Callable[[dict[str, Any], str], dict[str, Any] | None]) -> Any:
    """A copy of a FHIR JSON tree in which every Reference (an object with a string `reference`) is
    passed, already copied, to `replace(node, reference)`; a None answer keeps it as it is."""
    if isinstance(node, list):
        return [map_references(item, replace) for item in node]
    if not isinstance(node, dict):
        return node
    copied = {key: map_references(value, replace) for key, value in node.items()}
    reference = node.get("reference")
    if isinstance(reference, str):
        replaced = replace(copied, reference)
        if replaced is not None:
            return replaced
    return copied


def rewrite_references(
    resource: dict[str, Any],
    site: str,
    carried: frozenset[str],
    to_target: Callable[[str, str], str | None],
) -> RewriteResult:
    """Rewrite every Reference: carried types to their target id, others to logical references.

    `to_target(type, source_id)` gives the target id, or None when it is not known (a logical reference
    then); contained references ("#x") stay as they are.
    """
    dependencies: set[str] = set()

    def replace(node: dict[str, Any], reference: str) -> dict[str, Any] | None:
        if reference.startswith("#"):
            return None
        parsed = relative_reference(reference)
        target = to_target(*parsed) if parsed and parsed[0] in carried else None
        if parsed and target is not None:
            rewritten = f"{parsed[0]}/{target}"
            dependencies.add(rewritten)
            return {**node, "reference": rewritten}
        return _logical(site, node, reference)

    rewritten = map_references(resource, replace)
    return RewriteResult(rewritten, frozenset(dependencies))
