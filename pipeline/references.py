"""Reference rewriting: source-local references become target references or logical references."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

__all__ = ["RewriteResult", "logical_system", "rewrite_references"]

# A relative literal reference: Type/id, optionally with a version (FHIR R4 3.1.1.2, Reference.reference).
_RELATIVE = re.compile(r"^([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$")


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


def rewrite_references(
    resource: dict[str, Any],
    site: str,
    carried: frozenset[str],
    to_target: Callable[[str, str], str],
) -> RewriteResult:
    """Rewrite every Reference: carried types to their target id, others to logical references.

    `to_target(type, source_id)` gives the target id; contained references ("#x") stay as they are.
    """
    dependencies: set[str] = set()

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(item) for item in node]
        if not isinstance(node, dict):
            return node
        reference = node.get("reference")
        if isinstance(reference, str) and not reference.startswith("#"):
            match = _RELATIVE.match(reference)
            if match and match.group(1) in carried:
                rewritten = f"{match.group(1)}/{to_target(match.group(1), match.group(2))}"
                dependencies.add(rewritten)
                return {**{k: visit(v) for k, v in node.items() if k != "reference"}, "reference": rewritten}
            return _logical(site, {k: visit(v) for k, v in node.items()}, reference)
        return {key: visit(value) for key, value in node.items()}

    rewritten = {key: visit(value) for key, value in resource.items()}
    return RewriteResult(rewritten, frozenset(dependencies))
