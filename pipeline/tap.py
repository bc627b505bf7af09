"""`cdrsync tap`: print a topic's records as JSON lines, decoded, for analysts and ops."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from .deadletter import parse_failure_headers
from .errors import SchemaError
from .records import decode_any

__all__ = ["decode_value", "tap"]


def decode_value(value: bytes | None) -> Any:
    """Our Avro records → dict; Debezium JSON → dict; anything else → base64 text."""
    if value is None:
        return None
    try:
        schema, datum = decode_any(value)
        return {"_schema": schema, **datum}
    except SchemaError:
        pass
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return {"_base64": base64.b64encode(value).decode()}


def _matches(datum: Any, site: str | None, resource_type: str | None) -> bool:
    if not isinstance(datum, dict):
        return site is None and resource_type is None
    return (site is None or datum.get("site") == site) and (
        resource_type is None or datum.get("resource_type") == resource_type
    )


def tap(
    bootstrap: str,
    topic: str,
    *,
    site: str | None = None,
    resource_type: str | None = None,
    from_beginning: bool = True,
    limit: int | None = None,
    idle_seconds: float = 5.0,
) -> Iterator[dict[str, Any]]:
    """Yield decoded records of a topic until `limit` or `idle_seconds` without a new record."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"cdrsync-tap-{uuid.uuid4()}",  # a throw-away group: tapping never moves a real offset
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest" if from_beginning else "latest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=15).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise SchemaError(f"topic {topic!r} does not exist")
        start = OFFSET_BEGINNING if from_beginning else -1
        consumer.assign([TopicPartition(topic, p, start) for p in metadata.partitions])
        yield from _records(consumer, site, resource_type, limit, idle_seconds)
    finally:
        consumer.close()


def _records(
    consumer: Consumer, site: str | None, resource_type: str | None, limit: int | None, idle_seconds: float
) -> Iterator[dict[str, Any]]:
    emitted = 0
    while limit is None or emitted < limit:
        batch = consumer.consume(500, timeout=idle_seconds)
        if not batch:
            return
        for message in batch:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise SchemaError(f"read error: {error}")
                continue
            datum = decode_value(message.value())
            if not _matches(datum, site, resource_type):
                continue
            failure = parse_failure_headers(message.headers())
            yield {
                "topic": message.topic(),
                "partition": message.partition(),
                "offset": message.offset(),
                "key": (message.key() or b"").decode("utf-8", "replace"),
                "failure": failure.__dict__ if failure else None,
                "value": datum,
            }
            emitted += 1
            if limit is not None and emitted >= limit:
                return
