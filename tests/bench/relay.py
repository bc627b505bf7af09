"""The framework the pipeline is built on, alone: a Faust app relaying records, as they are, through the topics
DESIGN.md puts between Debezium's topic and the sink, and doing nothing else.

Run as a process of its own (`python -m tests.bench.relay worker`), configured by the environment:
RELAY_APP_ID (its consumer group), RELAY_BOOTSTRAP, RELAY_SOURCE (the topic it reads first), RELAY_HOPS
(comma-separated: the topics in between, created beforehand), RELAY_STATE_DIR, RELAY_FETCH_MAX_WAIT_MS (the
broker's longest hold of a fetch, as the worker's CDRSYNC_FETCH_MAX_WAIT_MS); then either RELAY_EXPECTED
(records to count at the end) and RELAY_BATCH (records per batch) for R1, or RELAY_TIMED for R3 (_timed).

What the pipeline's stages need from Faust, and no more: producers with acks=all and idempotence (DESIGN.md
decision 2), the worker's short fetch wait (agents/app.py ShortPollConsumerThread: without it a partition
can wait out Faust's 1.5 s long poll at every hop), one agent per hop. For R1 each agent reads its topic in
batches (take_events) and sends a batch's records on without awaiting their delivery: Faust flushes its
producer before it commits offsets, so no offset is committed before the records sent for it are on the next
topic. Offsets are committed at Faust's own pace (every 10 000 records or 2.8 s; the worker commits every
100 records or 1 s). The last agent counts what reaches the end. Nothing is decoded, validated, kept in a
table or audited. It prints `relay first <time>` when its first agent has its first batch and `relay done
<count> <time>` when the last has counted RELAY_EXPECTED (time.time()).
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver

Agent = Callable[[Any], Coroutine[Any, Any, None]]


class _Producer(aiokafka_driver.Producer):
    """Idempotence outside transactions, as the pipeline's own producer (agents/app.py) has it."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class _ConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    """The broker holds a fetch at most RELAY_FETCH_MAX_WAIT_MS, as the worker's (agents/app.py)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = int(os.environ.get("RELAY_FETCH_MAX_WAIT_MS", "50"))
        return consumer


class _Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> Any:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(aiokafka_driver.Transport):
    Producer = _Producer
    Consumer = _Consumer


class _App(faust.App):
    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def _announce(line: str) -> None:
    sys.stdout.write(f"{line}\n")
    sys.stdout.flush()


def build(env: dict[str, str]) -> faust.App:
    """The relay app for an environment as in the module's docstring."""
    hops = [name for name in env["RELAY_HOPS"].split(",") if name]
    app = _App(
        env["RELAY_APP_ID"],
        broker=f"kafka://{env['RELAY_BOOTSTRAP']}",
        store="memory://",
        datadir=env["RELAY_STATE_DIR"],
        web_enabled=False,
        producer_acks=-1,
        key_serializer="raw",
        value_serializer="raw",
        consumer_auto_offset_reset="earliest",
    )
    chain = [app.topic(name) for name in [env["RELAY_SOURCE"], *hops]]
    if env.get("RELAY_TIMED"):
        return _timed(app, chain)
    expected, batch = int(env["RELAY_EXPECTED"]), int(env.get("RELAY_BATCH", "500"))
    started = False

    def relay(target: Any, first: bool) -> Agent:
        async def agent(stream: Any) -> None:
            nonlocal started
            async for events in stream.take_events(batch, within=0.01):
                if first and not started:
                    started = True
                    _announce(f"relay first {time.time()}")
                for event in events:
                    await target.send(key=event.message.key, value=event.message.value)  # queued, not awaited

        return agent

    async def count(stream: Any) -> None:
        total = 0
        async for events in stream.take_events(batch, within=0.01):
            before, total = total, total + len(events)
            if before < expected <= total:
                _announce(f"relay done {total} {time.time()}")

    return _wired(app, chain, relay, count)


def _timed(app: faust.App, chain: list[Any]) -> faust.App:
    """The chain for R3: each record taken on its own as soon as it is there (stream.events(): nothing waits
    for a batch) and sent on at once. The first agent prints `relay in <value> <time>` with the time it took
    the record, after sending it on (printing is not timed); the last prints `relay out <value> <time>`."""

    def relay(target: Any, first: bool) -> Agent:
        async def agent(stream: Any) -> None:
            async for event in stream.events():
                taken = time.time()
                await target.send(key=event.message.key, value=event.message.value)
                if first:
                    _announce(f"relay in {event.message.value.decode()} {taken}")

        return agent

    async def end(stream: Any) -> None:
        async for event in stream.events():
            _announce(f"relay out {event.message.value.decode()} {time.time()}")

    return _wired(app, chain, relay, end)


def _wired(app: faust.App, chain: list[Any], relay: Callable[[Any, bool], Agent], end: Agent) -> faust.App:
    """An agent on each topic of the chain but the last, relaying to the next (relay(target, first)), and
    `end` on the last."""
    for n, (source, target) in enumerate(itertools.pairwise(chain)):
        app.agent(source, name=f"hop{n}")(relay(target, n == 0))
    app.agent(chain[-1], name="end")(end)
    return app


app = build(dict(os.environ)) if "RELAY_APP_ID" in os.environ else None

if __name__ == "__main__":
    if app is None:
        raise SystemExit("set RELAY_APP_ID and the other RELAY_* variables (tests/bench/relay.py)")
    app.main()
