"""What the order stage's park expiry check costs with many parked records, with and without its index.

A back-load can park tens of thousands of records (resources that came before what they reference). The
order stage checks each partition's parks for expiry once a minute (`agents/stages.py` _expire_parks).
Without `ParkDeadlines` that check read and decoded every parked record of the worker, in the event loop;
with it, only the park lists that are due. The table here is RocksDB with JSON values, as the worker's
(Faust's store, one database per table partition). No services are needed:

    .venv/bin/python -m tests.bench.parks [--parked 50000] [--output FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import orjson
import rocksdict

from pipeline.ordering import OrderState, ParkDeadlines, expire_parked, order_record
from pipeline.records import RoutedResource
from tests.casebuilder import routed_record

from .machine import describe_machine, load_average

PARTITIONS = 6
LIMIT_MS = 3_600_000


class RocksTable(MutableMapping[str, Any]):
    """A table as the worker's: a RocksDB database per partition, JSON values, each read decoded."""

    def __init__(self, path: Path) -> None:
        self._dbs = [rocksdict.Rdict(str(path / str(p)), options=rocksdict.Options(raw_mode=True)) for p in range(6)]
        self.reads = 0

    def _db(self, key: str) -> rocksdict.Rdict:
        return self._dbs[hash(key) % PARTITIONS]

    def __getitem__(self, key: str) -> Any:
        raw = self._db(key).get(key.encode())
        if raw is None:
            raise KeyError(key)
        self.reads += 1
        return orjson.loads(raw)

    def __setitem__(self, key: str, value: Any) -> None:
        self._db(key)[key.encode()] = orjson.dumps(value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        del self._db(key)[key.encode()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._db(key).get(key.encode()) is not None

    def __iter__(self) -> Iterator[str]:
        for db in self._dbs:
            yield from (key.decode() for key in db.keys())  # noqa: SIM118 (an Rdict, not a dict)

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        for db in self._dbs:
            for key, raw in db.items():
                self.reads += 1
                yield key.decode(), orjson.loads(raw)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def close(self) -> None:
        for db in self._dbs:
            db.close()


def _record(n: int) -> RoutedResource:
    """An Observation of a back-loaded patient whose Encounter has not come yet (about 1 KiB, as the demo's)."""
    body = {"resourceType": "Observation", "id": f"o{n}", "status": "final", "note": [{"text": "x" * 700}]}
    return routed_record(
        body,
        patient_key=f"p{n // 10}",
        op="CREATE",
        origin=("cdc.site-a.fhir.resource", n % 3, n),
        content_hash=f"h{n}",
        dependencies=[f"Patient/p{n // 10}", f"Encounter/e{n}"],
    )


def measure(parked: int, directory: Path, log: Any = print) -> dict[str, Any]:
    table = RocksTable(directory)
    deadlines = ParkDeadlines()
    asyncio.run(deadlines.rebuild([]))
    state = OrderState({}, table, {}, {}, deadlines=deadlines)
    for n in range(parked // 10):
        state.released[f"Patient/p{n}"] = {"hash": "", "deps": []}
    started = time.perf_counter()
    for n in range(parked):
        order_record(state, _record(n), now_ms=1_000 + n, partition=(n // 10) % PARTITIONS)
    log(f"parked {parked} records in {time.perf_counter() - started:.1f}s")
    now = 1_000 + parked + 60_000  # a minute later: nothing due yet, the usual case
    figures: dict[str, Any] = {"parked": parked, "partitions": PARTITIONS}
    for label, index in (("full_read", None), ("index", deadlines)):
        checked = OrderState(state.released, table, state.waiting, {}, deadlines=index)
        seconds, reads = [], []
        for partition in range(PARTITIONS):
            table.reads = 0
            began = time.perf_counter()
            assert expire_parked(checked, now, LIMIT_MS, partition) == []
            seconds.append(time.perf_counter() - began)
            reads.append(table.reads)
        figures[label] = {"ms_per_check": round(statistics.median(seconds) * 1000, 3), "lists_read": max(reads)}
        log(f"{label}: {figures[label]['ms_per_check']} ms per partition check, {max(reads)} park lists read")
    table.reads = 0
    began = time.perf_counter()
    asyncio.run(ParkDeadlines().rebuild(table.items()))
    figures["rebuild_seconds"] = round(time.perf_counter() - began, 3)
    log(f"rebuilding the index (after a start or a rebalance): {figures['rebuild_seconds']}s, in slices")
    table.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parked", type=int, default=50_000, help="records parked before the checks (50000)")
    parser.add_argument("--output", type=Path, help="also write the figures and the machine as JSON here")
    args = parser.parse_args(argv)
    if args.parked < 10:
        parser.error("--parked must be at least 10")
    with tempfile.TemporaryDirectory(prefix="cdrsync-bench-parks-") as directory:
        figures = measure(args.parked, Path(directory))
    machine = {k: v for k, v in describe_machine(Path(), "").items() if k not in ("fhir_server", "kafka", "java")}
    machine["load_end"] = load_average()
    cpu, cores, python = machine["cpu_model"], machine["cores"], machine["python"]
    print(f"machine: {cpu}, {cores} cores, Python {python}, load {machine['load_end']}")
    if args.output:
        args.output.write_bytes(orjson.dumps({"parks": figures, "machine": machine}, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
