"""What the parts the pipeline must use cost alone, measured beside the goals they bound.

R2 has the server alone (ceiling.py) and R3 the Kafka hop alone with a C client (hops.py). This adds:

* R1, validation alone: the records R1 drains, validated with fhir.resources (what "a validated FHIR R4
  resource" is made of here) in this process, one after the other, nothing else; and the project's
  `normalize_change` alone (decode, map, validate, hash). A worker that validates every record drains
  no faster than validation alone on the same core, so that rate over the raw loop's is the largest R1
  such a worker reaches on the machine.
* R1, Faust alone: R1's records relayed by one Faust worker process (relay.py) through as many topics as
  DESIGN.md puts between Debezium's topic and the sink, in batches, with the producer settings DESIGN.md
  asks for and the worker's fetch wait, doing nothing else. Each stage of the pipeline's worker is such an
  agent with work added, so its rate over the raw loop's is the most R1 such a worker process reaches on
  the machine.
* R3, capture alone: for every change R3 commits, the time from its commit to Debezium's record of it in
  Kafka (the record's timestamp). Every reader of Debezium's topic, the naive loop included, pays it before
  it sees the change.
* R3, a hop through aiokafka alone: the hop floor of hops.py with the Python client Faust is built on
  (aiokafka) relaying, on one event loop, instead of librdkafka.
* R3, the extra topics through Faust alone: the same relay.py taking one record at a time, fed at 1/s; each
  record's time from its first agent to its last, across the topics the pipeline has more than the naive loop.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.config import SiteConfig
from pipeline.normalize import SourcePosition, normalize_change
from pipeline.records import NormalizedResource
from pipeline.resources import validate_resource

from .context import Bench
from .hops import hop_times
from .machine import cpu_use, read_cpu
from .offsets import Offsets, commit_group, read_range
from .report import summarize
from .worker import stop_process

__all__ = [
    "capture_latencies",
    "relay_passages",
    "relay_times",
    "run_aiokafka_hop_floor",
    "run_faust_hop_floor",
    "run_faust_relay_floor",
    "validation_alone",
]

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def validation_alone(
    bench: Bench, site: SiteConfig, start: Offsets, end: Offsets, raw_per_second: float
) -> dict[str, Any]:
    """R1's records, read first (not timed), then mapped by normalize_change and validated by fhir.resources
    alone, each timed over all records; each rate and its ratio to the raw loop's."""
    topic = bench.source_topic
    with read_range(bench.settings.kafka_bootstrap, topic, start, end, f"bench-{bench.run_id}-floor", 1.0) as rows:
        messages = [(m.value(), m.partition() or 0, m.offset() or 0) for m in rows]
    began = time.perf_counter()
    records = [normalize_change(site, value, SourcePosition(topic, p, o)) for value, p, o in messages]
    normalize_seconds = time.perf_counter() - began
    resources = [orjson.loads(r.resource) for r in records if isinstance(r, NormalizedResource) and r.resource]
    began = time.perf_counter()
    for resource in resources:
        validate_resource(resource)
    validate_seconds = time.perf_counter() - began
    result: dict[str, Any] = {
        "measured": "records of R1 in memory, one after the other in the bench's process: nothing read or written",
        "cores": os.cpu_count() or 1,
        "validate": _rate(len(resources), validate_seconds, raw_per_second),
        "normalize_change": _rate(len(messages), normalize_seconds, raw_per_second),
    }
    bench.log(
        f"R1: validation alone: {result['validate']['per_second']}/s "
        f"(normalize_change: {result['normalize_change']['per_second']}/s)"
    )
    return result


def run_faust_relay_floor(
    bench: Bench, start: Offsets, end: Offsets, raw_per_second: float, hops: int = 3, batch: int = 500
) -> dict[str, Any]:
    """R1's records (source offsets start..end) through a relay.py process: its rate from spawn and from its
    first record to the last record counted at the end of the chain, each over the raw loop's, and its CPU.
    A failure is reported as {"error": ...}: the floor is beside the goal, not part of it."""
    measure = partial(_faust_relay_floor, bench, start, end, raw_per_second, hops, batch)
    return _beside_the_goal(bench, "R1: the Faust relay floor", measure)


def _faust_relay_floor(
    bench: Bench, start: Offsets, end: Offsets, raw_per_second: float, hops: int, batch: int
) -> dict[str, Any]:
    bootstrap = bench.settings.kafka_bootstrap
    name = f"bench-{bench.run_id}-relay"
    partitions = bench.config.topics.partitions_of("ready")  # as the pipeline's
    topics = _create_topics(bootstrap, [f"bench.{bench.run_id}.relay.{n}" for n in range(hops)], partitions)
    commit_group(bootstrap, name, {bench.source_topic: start})
    expected = sum(end.values()) - sum(start.values())
    settings = {"RELAY_EXPECTED": str(expected), "RELAY_BATCH": str(batch)}
    relay = _Relay(bench, name, [bench.source_topic, *topics], settings)
    try:
        cpu_before = read_cpu(relay.process.pid)
        first, done = relay.wait(lambda text: _both(relay_times(text)), timeout=120 + expected / 10)
        cpu = cpu_use(cpu_before, read_cpu(relay.process.pid))
    finally:
        stop_process(relay.process)
    result: dict[str, Any] = {
        "measured": f"one Faust worker process relaying R1's records through {hops} topics in batches of up to "
        f"{batch}, acks=all and idempotence, nothing else: spawn (and its first record) to the last record counted",
        "hops": hops,
        "partitions": partitions,
        "count": expected,
        "seconds": round(done - relay.spawned, 3),
        "per_second": round(expected / (done - relay.spawned), 1),
        "steady_per_second": round(expected / (done - first), 1) if done > first else None,
        "ratio_to_raw": round(expected / (done - relay.spawned) / raw_per_second, 4) if raw_per_second else None,
        "cpu": cpu,
    }
    bench.log(f"R1: Faust alone relaying through {hops} topics: {result['per_second']}/s")
    return result


def run_faust_hop_floor(bench: Bench, hops: int = 3, rate: float = 1.0, seconds: float = 30.0) -> dict[str, Any]:
    """R3's extra topics through Faust alone: a relay.py chain (RELAY_TIMED) of `hops` topics after a source
    topic of its own, fed one numbered record at a time at `rate` per second by a C producer; each record's time
    from the chain's first agent taking it to its last agent taking it. Records not through within 30 s of the
    last one sent count as unseen; a failure is reported as {"error": ...}."""
    return _beside_the_goal(bench, "R3: the Faust hop floor", partial(_faust_hop_floor, bench, hops, rate, seconds))


def _beside_the_goal(bench: Bench, what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """measure(), or {"error": ...} if it fails: reported in the results and the printed report instead of
    ending the run."""
    try:
        return measure()
    except Exception as error:
        bench.log(f"{what} failed: {error}")
        return {"error": str(error)}


def _faust_hop_floor(bench: Bench, hops: int, rate: float, seconds: float) -> dict[str, Any]:
    bootstrap = bench.settings.kafka_bootstrap
    name = f"bench-{bench.run_id}-fausthops"
    topics = _create_topics(bootstrap, [f"bench.{bench.run_id}.fausthops.{n}" for n in range(hops + 1)], 1)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 0})
    relay = _Relay(bench, name, topics, {"RELAY_TIMED": "1"})
    try:
        # Records until one is through the whole chain: group joins and connections are not measured.
        deadline = time.monotonic() + 180
        while not relay_passages(relay.text())[1]:
            relay.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Faust hop chain passed nothing on in 180 s (log: {relay.log_path})")
            producer.produce(topics[0], value=b"warm-up")
            producer.flush(10)
            time.sleep(1.0)
        count = int(rate * seconds)
        began = time.monotonic()
        for n in range(count):
            time.sleep(max(0.0, began + n / rate - time.monotonic()))
            producer.produce(topics[0], value=str(n).encode())
            producer.flush(10)
        wanted = {str(n) for n in range(count)}
        try:
            taken, out = relay.wait(lambda text: _all_out(relay_passages(text), wanted), timeout=30)
        except TimeoutError:  # what did come through is measured; the rest is unseen
            taken, out = relay_passages(relay.text())
    finally:
        stop_process(relay.process)
    chains = [out[v] - taken[v] for v in wanted if v in taken and v in out]
    result: dict[str, Any] = {
        "rate": rate,
        "hops": hops,
        "client": "faust",
        "chain": summarize(chains),
        "unseen": count - len(chains),
    }
    bench.log(f"R3: {hops} hops through Faust alone, {len(chains)} records: p50 {result['chain'].get('p50')} s")
    return result


def relay_passages(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """From a timed relay's output (whole lines only: the last may be half written): value -> time the chain's
    first agent took it (`relay in`), and value -> time its last agent took it (`relay out`)."""
    lines = _whole_lines(text)
    taken = {m[1]: float(m[2]) for m in re.finditer(r"relay in (\S+) ([0-9.]+)\s", lines)}
    out = {m[1]: float(m[2]) for m in re.finditer(r"relay out (\S+) ([0-9.]+)\s", lines)}
    return taken, out


def relay_times(text: str) -> tuple[float | None, float | None]:
    """The times of relay.py's `relay first <time>` and `relay done <count> <time>` in its output (Faust logs
    what an agent prints, so a line may carry more before them; whole lines only), None for one not there."""
    lines = _whole_lines(text)
    first = re.search(r"relay first ([0-9.]+)\s", lines)
    done = re.search(r"relay done [0-9]+ ([0-9.]+)\s", lines)
    return (float(first[1]) if first else None), (float(done[1]) if done else None)


def _whole_lines(text: str) -> str:
    return text[: text.rfind("\n") + 1]


def _all_out(
    passages: tuple[dict[str, float], dict[str, float]], wanted: set[str]
) -> tuple[dict[str, float], dict[str, float]] | None:
    return passages if wanted <= passages[1].keys() else None


def _both(times: tuple[float | None, float | None]) -> tuple[float, float] | None:
    first, done = times
    return (first, done) if first is not None and done is not None else None


class _Relay:
    """A relay.py process over a chain of topics (the first its source), its output in the bench's logs."""

    def __init__(self, bench: Bench, name: str, chain: list[str], env: dict[str, str]) -> None:
        self.log_path = bench.home / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        state = bench.home / "workers" / name
        state.mkdir(parents=True, exist_ok=True)
        settings = {
            "RELAY_APP_ID": name,
            "RELAY_BOOTSTRAP": bench.settings.kafka_bootstrap,
            "RELAY_SOURCE": chain[0],
            "RELAY_HOPS": ",".join(chain[1:]),
            "RELAY_STATE_DIR": str(state),
            "RELAY_FETCH_MAX_WAIT_MS": str(bench.settings.fetch_max_wait_ms),
        }
        command = [sys.executable, "-m", "tests.bench.relay", "worker", "--loglevel", "warn"]
        with self.log_path.open("ab") as log:
            self.spawned = time.time()
            self.process = subprocess.Popen(
                command, cwd=REPO, env={**os.environ, **settings, **env}, stdout=log, stderr=log
            )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the Faust relay exited with {self.process.returncode} (log: {self.log_path})")

    def wait(self, ready: Callable[[str], T | None], timeout: float) -> T:
        """Until ready(its output) gives a value; fails if the process ends first or the timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (value := ready(self.text())) is not None:
                return value
            self.check_alive()
            time.sleep(0.2)
        raise TimeoutError(f"the Faust relay did not finish in {timeout:.0f}s (log: {self.log_path})")


def _create_topics(bootstrap: str, names: list[str], partitions: int) -> list[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in names]
    for future in admin.create_topics(new).values():
        future.result(30)
    return names


def _rate(count: int, seconds: float, raw_per_second: float) -> dict[str, Any]:
    per_second = count / seconds if seconds > 0 else 0.0
    ratio = round(per_second / raw_per_second, 4) if raw_per_second else None
    return {"count": count, "seconds": round(seconds, 3), "per_second": round(per_second, 1), "ratio_to_raw": ratio}


def capture_latencies(changes: Sequence[Any], messages: Iterable[Message]) -> tuple[list[float], int]:
    """Seconds from each change's commit to the Kafka timestamp of Debezium's record holding its value; also the
    number of changes no record was found for. `changes` are latency.Change of one rate, whose values are unique
    in it (each change sets its own sequence number), and `messages` the source topic's records of that rate."""
    stamped: dict[float, float] = {}
    for message in messages:
        value = message.value()
        if not value:
            continue
        content = (orjson.loads(value).get("after") or {}).get("content")
        if not isinstance(content, str):
            continue
        quantity = orjson.loads(content).get("valueQuantity") or {}
        if "value" not in quantity:
            continue
        at = message.timestamp()[1] / 1000.0
        key = float(quantity["value"])
        stamped[key] = min(at, stamped.get(key, at))
    out, unseen = [], 0
    for change in changes:
        if change.value in stamped:
            out.append(stamped[change.value] - change.committed_at)
        else:
            unseen += 1
    return out, unseen


def run_aiokafka_hop_floor(bench: Bench, hops: int = 3, rate: float = 1.0, seconds: float = 30.0) -> dict[str, Any]:
    """hops.run_hop_floor with aiokafka in place of librdkafka: every producer and consumer of the chain is
    aiokafka's (acks=all, idempotent, linger 0, each send awaited), all on one event loop in a thread."""
    bootstrap = bench.settings.kafka_bootstrap
    topics = _create_topics(bootstrap, [f"bench.{bench.run_id}.aiohops.{n}" for n in range(hops)], 1)
    result: dict[str, Any] = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            chain = _aiokafka_chain(bootstrap, topics, f"bench-{bench.run_id}-aiohops", rate, seconds)
            result.update(asyncio.run(chain))
        except BaseException as error:  # reported below: the measurement fails with it
            errors.append(error)

    thread = threading.Thread(target=run, name="aiokafka-hops")
    thread.start()
    thread.join(seconds + 300)
    if thread.is_alive() or errors:
        raise RuntimeError(f"aiokafka hop floor: {errors[0] if errors else 'did not finish'}")
    hop = result["hop"]
    bench.log(f"R3: one aiokafka hop alone, {hop['count']} hops: p50 {hop.get('p50')} s, p99 {hop.get('p99')} s")
    return {"rate": rate, "hops": hops, "client": "aiokafka", **result}


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=0)


def _consumer(bootstrap: str, group: str, topic: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False
    )


async def _aiokafka_chain(bootstrap: str, topics: list[str], group: str, rate: float, seconds: float) -> dict[str, Any]:
    clients: list[AIOKafkaProducer | AIOKafkaConsumer] = []

    async def started(client: AIOKafkaProducer | AIOKafkaConsumer) -> Any:
        await client.start()
        clients.append(client)
        return client

    async def relay(source: str, target: str, n: int) -> None:
        consumer = await started(_consumer(bootstrap, f"{group}-{n}", source))
        producer = await started(_producer(bootstrap))
        async for message in consumer:
            await producer.send_and_wait(target, orjson.dumps([*orjson.loads(message.value), time.time()]))

    relays: list[asyncio.Task[None]] = []
    try:
        last = await started(_consumer(bootstrap, f"{group}-end", topics[-1]))
        source = await started(_producer(bootstrap))
        relays = [asyncio.ensure_future(relay(topics[n], topics[n + 1], n)) for n in range(len(topics) - 1)]
        # One record through the whole chain first: group joins and connections are not measured.
        await source.send_and_wait(topics[0], orjson.dumps([time.time()]))
        await asyncio.wait_for(_next(last, relays), 120)
        hop_samples: list[float] = []
        chains: list[float] = []
        count = int(rate * seconds)
        began = time.monotonic()
        for n in range(count):
            await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
            await source.send_and_wait(topics[0], orjson.dumps([time.time()]))
            stamps, arrived = await asyncio.wait_for(_next(last, relays), 30)
            times = hop_times(stamps, arrived)
            hop_samples += times
            chains.append(sum(times))
        return {"hop": summarize(hop_samples), "chain": summarize(chains), "unseen": count - len(chains)}
    finally:
        for task in relays:
            task.cancel()
        for client in reversed(clients):
            await client.stop()


async def _next(last: AIOKafkaConsumer, relays: list[asyncio.Task[None]]) -> tuple[list[float], float]:
    """The next record off the chain's end, with its arrival time; a relay that failed raises here."""
    for task in relays:
        if task.done():
            task.result()
    message = await last.getone()
    return orjson.loads(message.value), time.time()
