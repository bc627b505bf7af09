"""R1's floor in the framework the pipeline is built on: a Faust app relaying R1's records, as they are, through
the topics DESIGN.md puts between Debezium's topic and the sink, and doing nothing else.

Run as a process of its own (`python -m tests.bench.relay`), configured by the environment:
RELAY_APP_ID (its consumer group), RELAY_BOOTSTRAP, RELAY_SOURCE (Debezium's topic), RELAY_HOPS
(comma-separated: the topics in between, created beforehand), RELAY_EXPECTED (records to count at the
end), RELAY_BATCH (records per batch), RELAY_STATE_DIR; RELAY_TIMED for R3's chain (_timed).

What the pipeline's stages need from Faust, and no more: producers with acks=all and idempotence
(DESIGN.md decision 2), one agent per hop reading its topic in batches (take_events) and sending each
batch's records on without waiting for their delivery (Faust flushes its producer before it commits
offsets, so no offset is committed before the records sent for it are on the next topic); the last agent
counts what reaches the end. Nothing is decoded, validated, kept in a table or audited. Of three ways tried on
the bench's machine (2026-12-07, 8 739 records, one run each) this was the fastest: records taken one at a
time (stream.events()), 624/s; in batches, each batch's deliveries awaited together, 746/s; this, 948/s.

It prints one line when it has seen its first record and one when it has counted RELAY_EXPECTED: `relay
first <time>` and `relay done <count> <time>` (time.time()).
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


class _Producer(aiokafka_driver.Producer):
    """Idempotence outside transactions, as the pipeline's own producer (agents/app.py) has it."""

    def _settings_extra(self) -> Any:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class _Transport(aiokafka_driver.Transport):
    Producer = _Producer


class _App(faust.App):
    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)


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
        broker_commit_every=100,
        broker_commit_interval=1.0,
        topic_allow_declare=False,  # the hops exist: created by the bench with the partitions it chose
    )
    chain = [app.topic(name) for name in [env["RELAY_SOURCE"], *hops]]
    if env.get("RELAY_TIMED"):
        return _timed(app, chain)
    expected, batch = int(env["RELAY_EXPECTED"]), int(env.get("RELAY_BATCH", "500"))
    seen = {"count": 0}

    def relay(target: Any, first: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def agent(stream: Any) -> None:
            async for events in stream.take_events(batch, within=0.01):
                if first and not seen["count"]:
                    seen["count"] = -1  # announced once
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

    for n, (source, target) in enumerate(itertools.pairwise(chain)):
        app.agent(source, name=f"hop{n}")(relay(target, first=n == 0))
    app.agent(chain[-1], name="end")(count)
    return app


def _timed(app: faust.App, chain: list[Any]) -> faust.App:
    """The chain for R3: each record taken on its own as soon as it is there (stream.events(): nothing waits
    for a batch), sent on at once; the first agent prints `relay in <value> <time>` as it takes a record, the
    last `relay out <value> <time>`."""

    def relay(target: Any, first: bool) -> Callable[[Any], Coroutine[Any, Any, None]]:
        async def agent(stream: Any) -> None:
            async for event in stream.events():
                if first:
                    _announce(f"relay in {event.message.value.decode()} {time.time()}")
                await target.send(key=event.message.key, value=event.message.value)

        return agent

    async def end(stream: Any) -> None:
        async for event in stream.events():
            _announce(f"relay out {event.message.value.decode()} {time.time()}")

    for n, (source, target) in enumerate(itertools.pairwise(chain)):
        app.agent(source, name=f"hop{n}")(relay(target, first=n == 0))
    app.agent(chain[-1], name="end")(end)
    return app


app = build(dict(os.environ)) if "RELAY_APP_ID" in os.environ else None

if __name__ == "__main__":
    if app is None:
        raise SystemExit("set RELAY_APP_ID and the other RELAY_* variables (tests/bench/relay.py)")
    app.main()
