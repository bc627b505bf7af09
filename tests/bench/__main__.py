"""python -m tests.bench: the benchmark of issue 7 against a running stack (make bench starts one)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from pipeline.settings import Settings

from . import provision
from .context import Bench
from .dataset import Dataset
from .hapi import software_version
from .instant_ack import InstantAckServer
from .machine import describe_machine, load_average
from .report import format_report
from .synthea import SyntheaRun, bundles, synthea_version

MEASUREMENTS = ("r1", "r2", "r3", "memory")
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=(
            "Measure cdrsync against the running stack (make bench starts it): R1 pipeline drain ratio "
            "(instant-ack target vs a raw consume(500) loop), R2 sink ratio (real FHIR server vs a naive "
            "poll-map-PUT-commit loop), R3 source-commit -> target latency at steady rates, worker memory with "
            "10k and 100k+ patients in state, and a py-spy CPU profile during R1. Prints a table of the goals "
            "and writes everything, with a machine description, as JSON."
        ),
        epilog=(
            "The stack's ports come from the same variables as compose/native/env.sh (KAFKA_BOOTSTRAP, CONNECT_URL, "
            "PG_PORT, CENTRAL_FHIR_BASE_URL, CDRSYNC_HOME). Data goes to a site of its own, `bench` (database "
            "`bench`), never to site-a: see tests/bench/provision.py."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="what to measure")
    parser.add_argument("--patients", type=int, default=8, help="Synthea population for R1 and R2")
    parser.add_argument("--seed", type=int, default=20261121, help="Synthea seed (-s; -cs is --clinician-seed)")
    parser.add_argument("--clinician-seed", type=int, default=7, help="Synthea clinician seed (-cs)")
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 50.0], help="R3 change rates per second")
    parser.add_argument("--latency-seconds", type=float, default=60, help="R3: how long each rate runs")
    parser.add_argument(
        "--memory-patients",
        type=int,
        nargs=2,
        default=[10_000, 100_000],
        metavar=("FIRST", "SECOND"),
        help="patients in the worker's state at the two RSS readings",
    )
    parser.add_argument(
        "--memory-budget",
        type=float,
        default=1100,  # 100k patients at ~100/s on 2 cores; the whole run stays near 30 min
        metavar="SECONDS",
        help="time the memory phase may take; a step not drained by then is reported as incomplete",
    )
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profile during R1")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run in a few minutes: 2 patients, 15 s per "
        "rate, memory at 1k and 5k patients (figures not comparable with full runs)",
    )
    parser.add_argument("--output", type=Path, help="JSON result file (default: $CDRSYNC_HOME/bench/latest.json)")
    parser.add_argument("--keep-topics", action="store_true", help="keep the run's Kafka topics (default: deleted)")
    args = parser.parse_args(argv)
    if args.quick:
        args.patients, args.latency_seconds, args.memory_patients = 2, 15.0, [1_000, 5_000]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings()
    home = Path(os.environ.get("CDRSYNC_HOME", REPO / ".stack")) / "bench"
    hapi_url = os.environ.get("CENTRAL_FHIR_BASE_URL", "http://localhost:8080/fhir").rstrip("/")
    output = args.output or home / "latest.json"
    run_id = uuid.uuid4().hex[:6]
    started = time.time()
    log = _logger(started)
    machine = describe_machine(home.parent / "lib", software_version(hapi_url))
    machine["load_start"] = load_average()
    results: dict[str, Any] = {"run_id": run_id, "arguments": _arguments(args), "machine": machine}
    log(f"run {run_id}: {', '.join(args.only)}; stack lib {home.parent / 'lib'}, target {hapi_url}")
    root = provision.prepare(settings, home)
    bench = Bench(settings, home, root, run_id, hapi_url, log)
    device = InstantAckServer().start()
    try:
        _measure(bench, args, device, results)
    finally:
        device.close()
        if not args.keep_topics:
            from .offsets import delete_topics

            deleted = delete_topics(settings.kafka_bootstrap, (f"bench.{run_id}.", f"bench-{run_id}-"))
            log(f"deleted {len(deleted)} topics of run {run_id}")
        machine["load_end"] = load_average()
        results["seconds"] = round(time.time() - started, 1)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    print()
    print(format_report(results))
    print(f"\nJSON: {output}")
    return 0


def _measure(bench: Bench, args: argparse.Namespace, device: InstantAckServer, results: dict[str, Any]) -> None:
    if {"r1", "r2"} & set(args.only):
        data = _dataset(bench, args)
        results["dataset"] = {
            "synthea_version": synthea_version(),
            "patients": args.patients,
            "seed": args.seed,
            "clinician_seed": args.clinician_seed,
            "loaded_by_type": dict(sorted(data.summary.loaded().items())),
            "not_carried_by_type": dict(sorted(data.summary.not_carried.items())),
            "invalid_by_type": dict(sorted(data.summary.invalid.items())),
        }
        from .throughput import run_r1, run_r2

        if "r1" in args.only:
            results["r1"] = run_r1(bench, data, device, profile=not args.no_profile)
        if "r2" in args.only:
            results["r2"] = run_r2(bench, data)
            from .ceiling import run_ceiling

            ceiling = run_ceiling(bench, data)
            naive_rate = results["r2"]["naive"]["per_second"]
            results["r2"]["server_ceiling"] = {
                **ceiling.as_dict(),
                "ratio_to_naive": round(ceiling.rate / naive_rate, 2) if naive_rate else None,
            }
            bench.log(f"R2: server ceiling: {ceiling.count} resources in {ceiling.seconds:.1f} s, {ceiling.rate:.1f}/s")
    if "r3" in args.only:
        from .latency import run_r3

        results["r3"] = run_r3(bench, args.rates, args.latency_seconds)
        from .hops import run_hop_floor

        results["hop_floor"] = run_hop_floor(bench, hops=3, rate=1.0, seconds=min(args.latency_seconds, 30.0))
        from .floors import run_aiokafka_hop_floor, run_faust_hop_floor

        results["aiokafka_hop_floor"] = run_aiokafka_hop_floor(
            bench, hops=3, rate=1.0, seconds=min(args.latency_seconds, 30.0)
        )
        results["faust_hop_floor"] = run_faust_hop_floor(
            bench, hops=3, rate=1.0, seconds=min(args.latency_seconds, 30.0)
        )
    if "memory" in args.only:
        from .memory import run_memory

        results["memory"] = run_memory(bench, device, args.memory_patients, args.memory_budget)


def _dataset(bench: Bench, args: argparse.Namespace) -> Dataset:
    run = SyntheaRun(seed=args.seed, population=args.patients, clinician_seed=args.clinician_seed)
    out = run.generate(bench.home.parent / "lib" / "synthea", bench.home / "synthea", log=bench.log)
    data = Dataset(bundles(out), bench.carried)
    summary = data.summary
    bench.log(
        f"data set: {len(summary.resources)} resources of {args.patients} Synthea patients "
        f"({', '.join(f'{k} {v}' for k, v in sorted(summary.loaded().items()))}); not carried by the site: "
        f"{sum(summary.not_carried.values())}, invalid: {sum(summary.invalid.values())}"
    )
    return data


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _logger(started: float) -> Any:
    def log(text: str) -> None:
        print(f"[bench {time.time() - started:7.1f} s] {text}", file=sys.stderr, flush=True)

    return log


if __name__ == "__main__":
    sys.exit(main())
