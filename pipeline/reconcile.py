"""Which source changes ended where: read the dead-letter topic back as target references."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .config import Config
from .ids import target_id

__all__ = ["dead_letter_reasons", "dead_letter_ref"]


def dead_letter_ref(config: Config, item: dict[str, Any]) -> str | None:
    """The target reference (Type/id) a tapped dead letter stands for, None if it cannot be told."""
    value, failure = item.get("value"), item.get("failure") or {}
    if not isinstance(value, dict):
        return None
    if value.get("_schema") == "routed_resource":
        return f"{value['resource_type']}/{value['target_id']}"
    if value.get("_schema") == "normalized_resource":
        return f"{value['resource_type']}/{target_id(value['site'], value['resource_type'], value['source_id'])}"
    row = value.get("after") or value.get("before")  # a Debezium envelope that failed to normalize
    if not isinstance(row, dict):
        return None
    try:
        site = config.site_of_topic(failure.get("origin_topic") or item["topic"])
        return f"{row['resource_type']}/{target_id(site.site, row['resource_type'], row['id'])}"
    except (KeyError, TypeError):
        return None


def dead_letter_reasons(config: Config, items: Iterable[dict[str, Any]]) -> dict[str, str]:
    """Target reference → 'stage/error class: message' of its latest dead letter."""
    reasons = {}
    for item in items:
        ref = dead_letter_ref(config, item)
        failure = item.get("failure") or {}
        if ref is not None:
            reasons[ref] = f"{failure.get('stage')}/{failure.get('error_class')}: {failure.get('message', '')[:160]}"
    return reasons
