"""R3's floor: what one Kafka hop costs on this machine when nothing but a C client relays the records.

The pipeline reads Debezium's topic like the naive loop, then crosses three more topics (normalized,
identified, ready) before the sink writes. However fast a stage is, each of those hops is at least a
produce acknowledged by the broker (acks=all) and a fetch of the record by the next reader. This measures
exactly that and nothing else: records sent at a steady rate through a chain of topics, each relayed by a
confluent_kafka consumer and producer (linger 0, idempotent, acks=all, the produce acknowledged before the
next record), and the time each hop took, from clock readings in one process.
"""

from __future__ import annotations

import threading
import time
from itertools import pairwise
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from .context import Bench
from .report import summarize

__all__ = ["hop_times", "run_hop_floor"]

_READ = 0.05  # seconds a relay's poll waits before it looks at the stop flag again


def hop_times(stamps: list[float], arrived: float) -> list[float]:
    """One record's time on each hop: from each produce to the next, the last to its arrival."""
    times = [*stamps, arrived]
    return [later - earlier for earlier, later in pairwise(times)]


def _producer(bootstrap: str) -> Producer:
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all", "enable.idempotence": True})


def _consumer(bootstrap: str, group: str, topic: str) -> Consumer:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    return consumer


def _produce(producer: Producer, topic: str, stamps: list[float]) -> None:
    """Send the record with this produce's time added, and wait for the broker's acknowledgement."""
    producer.produce(topic, orjson.dumps([*stamps, time.time()]))
    if producer.flush(30) != 0:
        raise KafkaException(f"hop floor: a record to {topic} was not acknowledged within 30 s")


def _relay(bootstrap: str, group: str, source: str, target: str, stop: threading.Event, errors: list[str]) -> None:
    consumer, producer = _consumer(bootstrap, group, source), _producer(bootstrap)
    try:
        while not stop.is_set():
            message = consumer.poll(_READ)
            if message is None:
                continue
            if message.error():
                raise KafkaException(message.error())
            _produce(producer, target, orjson.loads(message.value()))
    except Exception as error:  # reported by run_hop_floor, which then fails the measurement
        errors.append(f"{source} -> {target}: {error}")
    finally:
        consumer.close()


def run_hop_floor(bench: Bench, hops: int = 3, rate: float = 1.0, seconds: float = 30.0) -> dict[str, Any]:
    """Records through `hops` topics (hops - 1 relays) at `rate` records/s for `seconds`: a hop's p50/p99 and
    the chain's."""
    bootstrap = bench.settings.kafka_bootstrap
    topics = [f"bench.{bench.run_id}.hops.{n}" for n in range(hops)]
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics]).values():
        future.result(30)
    group = f"bench-{bench.run_id}-hops"
    stop, errors = threading.Event(), []
    relays = [
        threading.Thread(target=_relay, args=(bootstrap, f"{group}-{n}", topics[n], topics[n + 1], stop, errors))
        for n in range(hops - 1)
    ]
    for relay in relays:
        relay.start()
    last = _consumer(bootstrap, f"{group}-end", topics[-1])
    source = _producer(bootstrap)
    hop_samples: list[float] = []
    chains: list[float] = []
    count = int(rate * seconds)
    try:
        _warm_up(source, last, topics[0])
        started = time.monotonic()
        sent = 0
        deadline = started + seconds + 60
        while len(chains) < count and time.monotonic() < deadline and not errors:
            if sent < count and time.monotonic() >= started + sent / rate:
                _produce(source, topics[0], [])
                sent += 1
            message = last.poll(min(_READ, max(0.0, started + sent / rate - time.monotonic())))
            if message is None or message.error():
                continue
            arrived = time.time()
            times = hop_times(orjson.loads(message.value()), arrived)
            hop_samples += times
            chains.append(sum(times))
    finally:
        stop.set()
        for relay in relays:
            relay.join(30)
        last.close()
    if errors:
        raise RuntimeError("hop floor: " + "; ".join(errors))
    hop = summarize(hop_samples)
    bench.log(f"R3: one Kafka hop alone, {hop['count']} hops: p50 {hop.get('p50')} s, p99 {hop.get('p99')} s")
    return {"rate": rate, "hops": hops, "hop": hop, "chain": summarize(chains), "unseen": count - len(chains)}


def _warm_up(source: Producer, last: Consumer, first_topic: str, timeout: float = 120.0) -> None:
    """One record through the whole chain first: the relays' group joins and connections are not measured."""
    _produce(source, first_topic, [])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = last.poll(_READ)
        if message is not None and not message.error():
            return
    raise RuntimeError(f"hop floor: the warm-up record did not cross the chain within {timeout:.0f} s")
