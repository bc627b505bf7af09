"""Version conflicts (DESIGN.md decision 8): what the conflicts topic holds, and `cdrsync conflicts`.

The sink writes over the target version its last write got (If-Match). When the target has moved on
(a clinician edited the resource at the central CDR, or another writer did), the change is not applied:
the sink sends a conflict record, JSON for reviewers, holding both versions (the hospital's incoming one
and the target's current one), their versions, where the change came from, and the ready record itself.

A reviewer then decides, with `cdrsync conflicts resolve`:

* `--take-incoming`: the hospital's version is written over the target version the reviewer saw. If the
  target changed again since, that write is a new conflict, not an overwrite of something unseen.
* `--keep-target`: the target keeps its version, and the sink takes it as the base for the next change of
  that resource from the hospital (which is then written over it, as new information).

Either way the sink is told through the ready topic, in the partition of that resource (its per-resource
state lives there), with a header naming the decision and the reviewed version; the decision is recorded
in a compacted topic (so `list` shows what is still open) and as an audit event. Dry run unless --execute.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .config import Config
from .dlq import iso_time, operator_name, read_all, read_at, resolutions
from .errors import CdrsyncError, EnvelopeError
from .kafkaadmin import AcknowledgedProducer
from .records import RoutedResource

__all__ = [
    "RESOLUTION_HEADER",
    "Conflict",
    "conflict_record",
    "differing_fields",
    "parse_resolution",
    "read_conflicts",
    "resolve_conflicts",
]

RESOLUTION_HEADER = "cdrsync-conflict-resolution"  # "<decision>:<target version the reviewer saw>"
Decision = Literal["take-incoming", "keep-target"]
DECISIONS: tuple[Decision, ...] = ("take-incoming", "keep-target")


def conflict_record(
    record: RoutedResource,
    ready_value: bytes | None,
    origin: tuple[str, int, int],
    reason: str,
    current: dict[str, Any] | None,
    our_version: str | None,
    now_ms: int,
) -> bytes:
    """The conflicts topic's value: both versions and what is needed to resolve it later."""
    current_version = ((current or {}).get("meta") or {}).get("versionId")
    return orjson.dumps(
        {
            "target": record.target,
            "target_ref": record.target_ref,
            "site": record.site,
            "resource_type": record.resource_type,
            "source_id": record.source_id,
            "source_version": record.source_version,
            "source_lsn": record.source_lsn,
            "content_hash": record.content_hash,
            "detected_ms": now_ms,
            "reason": reason,
            "our_last_version": our_version,
            "current_version": None if current_version is None else str(current_version),
            "incoming": orjson.loads(record.resource) if record.resource else None,
            "current": current,
            "origin": {"topic": origin[0], "partition": origin[1], "offset": origin[2]},
            "record": base64.b64encode(ready_value).decode() if ready_value is not None else None,
        }
    )


def parse_resolution(headers: Sequence[tuple[str, bytes]]) -> tuple[Decision, str] | None:
    """(decision, reviewed target version) from a ready record's headers; None for an ordinary record."""
    for name, value in headers:
        if name == RESOLUTION_HEADER:
            decision, _, version = value.decode().partition(":")
            if decision not in DECISIONS or not version:
                raise EnvelopeError(f"malformed {RESOLUTION_HEADER} header: {value!r}")
            return decision, version  # type: ignore[return-value]
    return None


def differing_fields(incoming: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Top-level fields whose content differs (meta, id and cdrsync's own extension aside): what to review."""
    ignored = {"meta", "id", "text"}
    a, b = incoming or {}, current or {}

    def plain(resource: dict[str, Any], name: str) -> Any:
        value = resource.get(name)
        if name == "extension":
            value = [e for e in value or [] if not str(e.get("url", "")).startswith("urn:cdrsync:")] or None
        return value

    return sorted(name for name in (set(a) | set(b)) - ignored if plain(a, name) != plain(b, name))


@dataclass(frozen=True)
class Conflict:
    """One record of the conflicts topic."""

    partition: int
    offset: int
    key: bytes | None
    value: dict[str, Any]
    resolution: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    def summary(self) -> dict[str, Any]:
        """Ids, versions and the fields that differ; no clinical content."""
        v = self.value
        origin = v.get("origin") or {}
        return {
            "id": self.id,
            "detected_at": iso_time(int(v.get("detected_ms") or 0)),
            "site": v.get("site"),
            "target": v.get("target"),
            "target_ref": v.get("target_ref"),
            "source_id": v.get("source_id"),
            "source_lsn": v.get("source_lsn"),
            "our_last_version": v.get("our_last_version"),
            "current_version": v.get("current_version"),
            "differing_fields": differing_fields(v.get("incoming"), v.get("current")),
            "origin": f"{origin.get('topic')}[{origin.get('partition')}]@{origin.get('offset')}",
            "status": self.resolution["action"] if self.resolution else "open",
        }

    def shown(self, with_patient_data: bool) -> dict[str, Any]:
        """For `show`: both versions only when asked for."""
        hidden = "<withheld: patient data; add --with-patient-data>"
        return {
            **self.summary(),
            "reason": self.value.get("reason"),
            "resolution": self.resolution,
            "incoming": self.value.get("incoming") if with_patient_data else hidden,
            "current": self.value.get("current") if with_patient_data else hidden,
        }


def read_conflicts(bootstrap: str, config: Config, ids: Iterable[str] | None = None) -> list[Conflict]:
    """Every conflict record, with the decision taken on it, if any; with ids, only those (read where they are)."""
    done = resolutions(bootstrap, config.topics.name("conflicts_resolved"))
    topic = config.topics.name("conflicts")
    found = []
    for message in read_all(bootstrap, topic) if ids is None else read_at(bootstrap, topic, ids):
        try:
            value = orjson.loads(message.value() or b"null")
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise CdrsyncError(f"conflict {message.partition()}:{message.offset()} is not a conflict record")
        conflict_id = f"{message.partition()}:{message.offset()}"
        found.append(Conflict(message.partition(), message.offset(), message.key(), value, done.get(conflict_id)))
    return found


def resolve_conflicts(
    bootstrap: str,
    config: Config,
    chosen: list[Conflict],
    decision: Decision,
    *,
    reason: str = "",
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> int:
    """Tell the sink the decision on each conflict, record it and audit it; how many were resolved."""
    for conflict in chosen:
        if conflict.value.get("record") is None or conflict.value.get("current_version") is None:
            raise CdrsyncError(
                f"conflict {conflict.id} lacks the record or the target's version (was the resource deleted "
                "at the target?): resolve it at the target by hand, then mark it with --keep-target after a re-read"
            )
    producer = AcknowledgedProducer(bootstrap)
    operator, ready = operator_name(), config.topics.name("ready")

    def send(conflict: Conflict, report: Callable[[Any, Any], None]) -> None:
        v = conflict.value
        origin = v.get("origin") or {}
        where: dict[str, Any] = {"partition": int(origin["partition"])} if origin.get("topic") == ready else {}
        header = f"{decision}:{v['current_version']}".encode()
        record = base64.b64decode(v["record"])
        producer.producer.produce(
            ready, record, conflict.key, headers=[(RESOLUTION_HEADER, header)], on_delivery=report, **where
        )

    def record(conflict: Conflict) -> None:
        v = conflict.value
        origin = v.get("origin") or {}
        at_ms = int(time.time() * 1000)
        resolution = {"action": decision, "at": iso_time(at_ms), "by": operator, "over_version": v["current_version"]}
        if reason:
            resolution["reason"] = reason
        producer.produce(config.topics.name("conflicts_resolved"), orjson.dumps(resolution), conflict.id.encode())
        detail = f"conflict {conflict.id} resolved by {operator}: {decision} over version {v['current_version']}"
        event = {
            "at_ms": at_ms,
            "step": "conflict_resolved",
            "site": v.get("site") or "unknown",
            "target": v.get("target"),
            "resource_type": v.get("resource_type") or str(v.get("target_ref", "unknown/")).partition("/")[0],
            "source_id": str(v.get("source_id") or "unknown"),
            "target_id": str(v.get("target_ref", "")).partition("/")[2] or None,
            "source_lsn": v.get("source_lsn"),
            "source_commit_ms": None,
            "origin": f"{origin.get('topic')}[{origin.get('partition')}]@{origin.get('offset')}",
            "content_hash": v.get("content_hash"),
            "trigger": "operator",
            "detail": (detail + (f": {reason}" if reason else ""))[:500],
        }
        producer.produce(config.topics.name("audit"), orjson.dumps(event), conflict.id.encode())

    def what(conflict: Conflict) -> str:
        return f"the decision on conflict {conflict.id}"

    return producer.send_then_record(chosen, send, record, what, progress)
