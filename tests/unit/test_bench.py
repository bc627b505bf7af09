"""The benchmark harness' pure parts (tests/bench): percentiles, Synthea flattening, latency matching,
profile parsing, goals and report, the derived bench site. The measurements themselves run in `make bench`."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from pathlib import Path

import orjson
import pytest

from pipeline.config import load_config
from pipeline.connect import load_connectors
from pipeline.identity import global_patient_key
from pipeline.ids import target_id
from pipeline.status import parse_metrics
from tests.bench.ceiling import transaction
from tests.bench.dataset import Dataset, expected_ref, flatten_bundle
from tests.bench.floors import _rate, capture_latencies, relay_passages, relay_times
from tests.bench.hops import hop_times
from tests.bench.instant_ack import AckLog, _bundle_response, apply_write
from tests.bench.latency import Change, latencies
from tests.bench.machine import CpuReading, cpu_use, read_cpu
from tests.bench.memory import memory_result
from tests.bench.naive import NaiveResult, NaiveRun, _Writer, start_naive_loop
from tests.bench.profile import parse_collapsed, top_functions
from tests.bench.provision import BENCH_SITE, write_config_root
from tests.bench.report import evaluate_goals, format_report, percentile, summarize
from tests.bench.synthea import SyntheaRun, synthea_version
from tests.bench.worker import memory_parts, stage_buckets, stage_load, stage_times
from tests.casebuilder import KVNR_SYSTEM, kvnr_of, observation_for, patient, routed_record

pytestmark = pytest.mark.unit

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "synthea" / "patient-excerpt.json"
CARRIED = frozenset({"Patient", "Encounter", "Condition", "Observation", "DiagnosticReport"})


def synthea_bundle() -> dict:
    return orjson.loads(FIXTURE.read_bytes())


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 99) == 99.0
    assert percentile([7.0], 99) == 7.0


def test_percentile_refuses_no_values_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarize_gives_count_and_quantiles() -> None:
    assert summarize([]) == {"count": 0}
    summary = summarize([0.1 * n for n in range(1, 11)])
    assert summary["count"] == 10 and summary["max"] == 1.0 and summary["p50"] == 0.55


def test_flatten_rewrites_synthea_references_to_namespaced_ids() -> None:
    out = flatten_bundle(synthea_bundle(), "r1", CARRIED)
    kinds = [r["resourceType"] for r in out.resources]
    assert kinds == ["Patient", "Encounter", "Condition", "Observation", "Observation", "DiagnosticReport"]
    assert out.not_carried == Counter({"Claim": 1}) and not out.invalid
    patient, encounter = out.resources[0], out.resources[1]
    assert all(r["id"].startswith("r1-") for r in out.resources)
    assert encounter["subject"]["reference"] == f"Patient/{patient['id']}"
    report = out.resources[-1]
    observation_ids = {r["id"] for r in out.resources if r["resourceType"] == "Observation"}
    assert {ref["reference"].removeprefix("Observation/") for ref in report["result"]} == observation_ids
    assert report["encounter"]["reference"] == f"Encounter/{encounter['id']}"


def test_flatten_keeps_what_it_cannot_resolve_and_adds_the_shared_identifier() -> None:
    out = flatten_bundle(synthea_bundle(), "r1", CARRIED)
    patient = out.resources[0]
    assert {"system": KVNR_SYSTEM, "value": kvnr_of(patient["id"])} in patient["identifier"]
    text = orjson.dumps(out.resources).decode()
    assert "Practitioner?identifier=" in text  # conditional references: cdrsync makes them logical references
    condition = out.resources[2]
    assert condition["encounter"]["reference"].startswith("urn:uuid:")  # its encounter is not in the excerpt


def test_flatten_counts_invalid_resources_and_a_dataset_skips_them_in_every_namespace() -> None:
    bundle = synthea_bundle()
    bundle["entry"][3]["resource"].pop("code")  # an Observation without its required code
    data = Dataset([bundle], CARRIED)
    assert data.summary.invalid == Counter({"Observation": 1})
    again = data.resources("r2p")
    assert [r["resourceType"] for r in again].count("Observation") == 1
    assert all(r["id"].startswith("r2p-") for r in again)


def test_flatten_refuses_ids_longer_than_fhir_allows() -> None:
    with pytest.raises(ValueError, match="64"):
        flatten_bundle(synthea_bundle(), "x" * 40, CARRIED)


def test_expected_ref_is_where_the_pipeline_writes() -> None:
    patient = {"resourceType": "Patient", "id": "r1-p"}
    assert expected_ref(patient, "bench") == f"Patient/{global_patient_key(KVNR_SYSTEM, kvnr_of('r1-p'))}"
    observation = {"resourceType": "Observation", "id": "r1-o"}
    assert expected_ref(observation, "bench") == f"Observation/{target_id('bench', 'Observation', 'r1-o')}"


def test_latency_is_measured_to_the_first_version_holding_the_value_or_a_later_one() -> None:
    changes = [Change("Observation/a", 1, 100.0), Change("Observation/a", 2, 100.5), Change("Observation/b", 3, 101.0)]
    versions = {"Observation/a": [(0.0, 99.0), (2.0, 100.8)], "Observation/b": []}
    values, unseen = latencies(changes, versions)
    assert values == pytest.approx([0.8, 0.3])  # change 1 was folded into the version holding 2
    assert unseen == 1


def test_profile_counts_own_and_total_samples_once_per_stack() -> None:
    raw = "main (a.py:1);loop (a.py:5);work (b.py:2) 6\nmain (a.py:1);loop (a.py:5);loop (a.py:5) 3\nbad line\n"
    own, total, samples = parse_collapsed(raw)
    assert samples == 9
    assert own == Counter({"work (b.py:2)": 6, "loop (a.py:5)": 3})
    assert total["loop (a.py:5)"] == 9 and total["main (a.py:1)"] == 9 and total["work (b.py:2)"] == 6
    assert top_functions(own, samples, 1) == [{"function": "work (b.py:2)", "samples": 6, "percent": 66.7}]


def test_instant_ack_answers_like_a_server_that_creates_then_updates() -> None:
    log = AckLog()
    assert apply_write(log, "PUT", "Patient/p", b"{}", 1.0) == (201, 1)
    assert apply_write(log, "PUT", "Patient/p", b"{}", 2.0) == (200, 2)
    assert apply_write(log, "DELETE", "Patient/p", None, 3.0) == (204, 3)
    assert log.seen({"Patient/p", "Patient/q"}) == 1
    assert log.last_ack_of({"Patient/p"}) == 3.0 and log.last_ack_of({"Patient/q"}) is None


def test_instant_ack_answers_reads_in_a_batch_with_what_was_written() -> None:
    log = AckLog()
    apply_write(log, "PUT", "Patient/p", b'{"resourceType":"Patient","id":"p"}', 1.0)
    bundle = {"type": "batch", "entry": [{"request": {"method": "GET", "url": u}} for u in ("Patient/p", "Patient/q")]}
    answer = _bundle_response(log, bundle, 2.0)
    found, missing = answer["entry"]
    assert answer["type"] == "batch-response"
    assert found["resource"]["id"] == "p" and found["resource"]["meta"]["versionId"] == "1"
    assert missing["response"]["status"].startswith("404") and "resource" not in missing
    assert log.writes == 1  # reads are not writes


def _results() -> dict:
    return {
        "r1": {
            "ratio": 0.05,
            "resources": 10,
            "raw": {"per_second": 1000.0},
            "pipeline": {"per_second": 50.0, "steady_per_second": 60.0, "worker_ready_seconds": 4.0},
        },
        "r2": {
            "ratio": 12.0,
            "resources": 10,
            "pipeline": {"per_second": 120.0},
            "naive": {"per_second": 10.0},
            "server_ceiling": {"per_second": 30.0, "bundle_size": 50, "ratio_to_naive": 3.0},
        },
        "r3": {
            "50": {
                "pipeline": {"count": 5, "p50": 0.5, "p99": 0.9, "max": 1.0},
                "naive": {"count": 5, "p50": 1.0, "p99": 2.0, "max": 2.0},
            }
        },
        "memory": memory_result(
            100.0,
            [
                {
                    "patients": 10,
                    "rss_mib": 200.0,
                    "complete": True,
                    "parts_mib": {"heap_in_use": 80.5, "memtables": 9.0},
                },
                {"patients": 30, "rss_mib": 230.0, "complete": False},
            ],
            [10, 100],
            60,
        ),
        "machine": {"cpu_model": "Test CPU", "cores": 2},
    }


def test_goals_pass_fail_not_run_and_incomplete() -> None:
    verdicts = {g.name: g.verdict for g in evaluate_goals(_results())}
    assert verdicts == {
        "R1 pipeline drain ratio": "FAIL",
        "R2 sink ratio": "PASS",
        "R3 p99 at 50/s, pipeline / naive": "PASS",
        "R3 p50 at 1/s, pipeline / naive": "not run",
        "Memory growth 10k -> 100k patients": "incomplete",
    }


def test_memory_growth_is_from_the_first_reading_to_the_last() -> None:
    result = memory_result(
        100.0,
        [{"patients": 10, "rss_mib": 200.0, "complete": True}, {"patients": 100, "rss_mib": 210.0, "complete": True}],
        [10, 100],
        60,
    )
    assert result["complete"] and result["growth_percent"] == 5.0
    assert evaluate_goals({"memory": result})[-1].verdict == "PASS"


def test_report_table_names_every_goal_and_the_machine() -> None:
    text = format_report(_results())
    assert "R2 sink ratio" in text and "12.00" in text and "PASS" in text
    assert "0.45 (900 ms / 2000 ms)" in text
    assert "+15.0 % (10 -> 30 only)" in text
    assert "Test CPU, 2 cores" in text
    assert "at 10 patients, MiB by part: heap_in_use 80.5, memtables 9.0" in text
    assert "the server alone (bundles of 50 PUTs, one at a time, nothing else): 30.0/s = 3.0 x the naive" in text


def test_hop_times_run_from_each_produce_to_the_next_and_the_last_to_arrival() -> None:
    assert hop_times([10.0, 10.004, 10.0065], 10.0105) == pytest.approx([0.004, 0.0025, 0.004])
    assert hop_times([5.0], 5.003) == pytest.approx([0.003])


def _hop_floor(hop_p50: float, chain_p50: float) -> dict:
    """A hop floor's result at 1/s over 3 topics: 90 hops in 30 chains."""
    return {
        "rate": 1.0,
        "hops": 3,
        "hop": {"count": 90, "p50": hop_p50, "p99": 0.006, "max": 0.007},
        "chain": {"count": 30, "p50": chain_p50, "p99": 0.015, "max": 0.016},
        "unseen": 0,
    }


def test_report_sets_the_hop_floor_against_what_the_latency_goal_leaves() -> None:
    results = {
        **_results(),
        "r3": {"1": {"naive": {"count": 3, "p50": 0.025, "p99": 0.03, "max": 0.03}}},
        "hop_floor": _hop_floor(hop_p50=0.0031, chain_p50=0.0102),
    }
    text = format_report(results)
    assert "one Kafka hop alone (a C client relaying, acks=all, linger 0) at 1/s, 90 hops: p50 3.1 ms" in text
    assert "at 1/s the goal leaves them 5.0 ms (0.2 x the naive loop's p50), and 3 hops alone take 10.2 ms" in text


class _Record:
    """What capture_latencies reads of a confluent_kafka Message: its value and its timestamp."""

    def __init__(self, value: bytes | None, at_ms: int) -> None:
        self._value, self._at_ms = value, at_ms

    def value(self) -> bytes | None:
        return self._value

    def timestamp(self) -> tuple[int, int]:
        return 1, self._at_ms


def _debezium(value: float | None, at_ms: int) -> _Record:
    resource = {"resourceType": "Observation", "id": "o1"}
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": "mg"}
    envelope = {"before": None, "after": {"id": "o1", "content": orjson.dumps(resource).decode()}, "op": "u"}
    return _Record(orjson.dumps(envelope), at_ms)


def test_capture_is_timed_from_each_commit_to_debezium_s_first_record_of_its_value() -> None:
    changes = [Change(f"Observation/{n}", float(n), at) for n, at in ((1, 100.0), (2, 100.5), (3, 101.0))]
    records = [
        _debezium(1.0, 100_021),
        _debezium(2.0, 100_540),
        _debezium(2.0, 100_530),  # the same change read again (a connector restart): its first record counts
        _debezium(None, 100_600),  # a row without a value, as the warm-up's Patients
        _Record(None, 100_700),  # a tombstone
    ]
    captured, unseen = capture_latencies(changes, records)  # type: ignore[arg-type]
    assert captured == pytest.approx([0.021, 0.030])
    assert unseen == 1  # the third change has no record


def test_a_floor_s_rate_is_set_against_the_raw_loop() -> None:
    assert _rate(3000, 1.5, 40000.0) == {"count": 3000, "seconds": 1.5, "per_second": 2000.0, "ratio_to_raw": 0.05}
    assert _rate(0, 0.0, 0.0)["ratio_to_raw"] is None


def test_report_sets_each_part_measured_alone_against_the_goal_it_bounds() -> None:
    results = _results()
    results["r1"]["validation_alone"] = {
        "cores": 2,
        "validate": {"count": 10, "seconds": 0.003, "per_second": 3333.3, "ratio_to_raw": 0.0913},
        "normalize_change": {"count": 10, "seconds": 0.004, "per_second": 2500.0, "ratio_to_raw": 0.0685},
    }
    results["r3"]["50"]["pipeline"]["capture"] = {"count": 5, "p50": 0.021, "p99": 0.048, "max": 0.05, "unseen": 0}
    results["r3"]["50"]["naive"]["p99"] = 0.053
    results["r3"]["1"] = {"naive": {"count": 3, "p50": 0.028, "p99": 0.03, "max": 0.03}}
    results["aiokafka_hop_floor"] = {**_hop_floor(hop_p50=0.0029, chain_p50=0.0088), "client": "aiokafka"}
    text = format_report(results)
    assert "validation alone (fhir.resources on each of R1's resources" in text
    assert "3333.3/s = 0.0913 x the raw loop, the largest R1 a worker process that validates every record" in text
    assert "0.18 x with all 2 cores validating, nothing else running" in text
    assert "normalize_change alone: 2500.0/s = 0.0685 x" in text
    assert "50/s capture alone (commit to Debezium's record in Kafka, which every reader waits for), 5 changes" in text
    assert "5 changes: p50 21 ms, p99 48 ms" in text
    assert "the goal asks the pipeline's p99 to be 26 ms at most (0.5 x the naive loop's)" in text
    assert "the capture alone takes 48 ms at p99" in text
    assert "through aiokafka (the client Faust is built on, acks=all, linger 0) at 1/s, 90 hops: p50 2.9 ms" in text
    assert "3 in a row: p50 8.8 ms (the 1/s goal leaves the pipeline's extra topics 5.6 ms)" in text


def test_report_sets_faust_alone_against_r1_and_counts_what_the_worker_wrote_per_resource() -> None:
    results = _results()
    results["r1"]["pipeline"].update({"count": 10, "per_second": 50.0})
    results["r1"]["faust_alone"] = {
        "hops": 3,
        "partitions": 6,
        "per_second": 400.0,
        "steady_per_second": 800.0,
        "ratio_to_raw": 0.0125,
        "cpu": {"process_cpu_seconds": 6.25, "process_core_share": 0.8},
    }
    results["r1"]["pipeline"]["records_written"] = {"fhir.ready.v1": 10, "audit.v1": 30, "x-changelog": 25, "dlq": 0}
    text = format_report(results)
    assert "Faust alone (one worker process relaying R1's records through 3 topics of 6 partitions in batches" in text
    assert "400.0/s (steady 800.0/s, 6.2 CPU s, 80 % of one core) = 0.0125 x the raw loop" in text
    assert "the pipeline's rate is 0.12 of it" in text
    written = (
        "records the worker wrote to Kafka: 6.50 per resource (audit.v1 3.00, x-changelog 2.50, fhir.ready.v1 1.00)"
    )
    assert written in text


def test_relay_times_are_read_from_the_lines_faust_logs_for_what_the_relay_prints() -> None:
    log = (
        "[2026-12-07 20:27:41,795] [5619] [ERROR] Topic x not found in cluster metadata\n"
        "[2026-12-07 20:27:41,912] [5619] [WARNING] relay first 1796675261.9127827 \n"
        "[2026-12-07 20:27:48,290] [5619] [WARNING] relay done 2913 1796675268.2905467 \n"
    )
    assert relay_times(log) == (1796675261.9127827, 1796675268.2905467)
    assert relay_times(log.split("\n", 2)[0]) == (None, None)
    assert relay_times(log[: log.rindex("2905467")]) == (1796675261.9127827, None)  # a line still being written


def test_a_floor_that_failed_is_reported_as_not_measured_and_the_report_goes_on() -> None:
    results = _results()
    results["r1"]["faust_alone"] = {"error": "the Faust relay exited with 1 (log: x.log)"}
    results["faust_hop_floor"] = {"error": "the Faust hop chain passed nothing on in 180 s (log: y.log)"}
    text = format_report(results)
    assert "R1  Faust alone: not measured (the Faust relay exited with 1 (log: x.log))" in text
    assert "R3  the extra topics through Faust alone: not measured (the Faust hop chain passed nothing on" in text
    assert "Memory  worker RSS" in text


def test_a_timed_relay_s_passages_are_read_by_value_from_its_first_and_last_agent() -> None:
    log = (
        "[x] [WARNING] relay in warm-up 10.5 \n"
        "[x] [WARNING] relay out warm-up 10.52 \n"
        "[x] [WARNING] relay in 0 11.0 \n"
        "[x] [WARNING] relay in 1 12.0 \n"
        "[x] [WARNING] relay out 0 11.009 \n"
        "[x] [WARNING] relay out 1 12.00"
    )
    taken, out = relay_passages(log)
    assert taken == {"warm-up": 10.5, "0": 11.0, "1": 12.0}
    assert out == {"warm-up": 10.52, "0": 11.009}  # 1's line is not whole yet


def test_report_sets_three_hops_through_faust_alone_against_what_the_latency_goal_leaves() -> None:
    results = _results()
    results["r3"]["1"] = {"naive": {"count": 3, "p50": 0.028, "p99": 0.03, "max": 0.03}}
    results["faust_hop_floor"] = {
        "rate": 1.0,
        "hops": 3,
        "client": "faust",
        "chain": {"count": 30, "p50": 0.0091, "p99": 0.0153, "max": 0.02},
        "unseen": 0,
    }
    text = format_report(results)
    assert "3 topics through Faust alone (a Faust app relaying one record at a time, acks=all) at 1/s" in text
    assert "30 records: p50 9.1 ms, p99 15.3 ms (the 1/s goal leaves them 5.6 ms)" in text


def test_ceiling_bundle_puts_each_resource_at_its_target_reference_in_order() -> None:
    records = [
        routed_record({"resourceType": kind, "id": rid}, patient_key="pk")
        for kind, rid in (("Patient", "p1"), ("Observation", "o1"))
    ]
    bundle = orjson.loads(transaction(records))
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert [e["request"] for e in bundle["entry"]] == [
        {"method": "PUT", "url": "Patient/p1"},
        {"method": "PUT", "url": "Observation/o1"},
    ]
    assert [e["resource"]["id"] for e in bundle["entry"]] == ["p1", "o1"]


def test_bench_site_is_site_a_in_its_own_database_and_its_connector_matches(tmp_path: Path) -> None:
    root = write_config_root(tmp_path / "config")
    config = load_config(root)
    site, site_a = config.sites[BENCH_SITE], load_config(Path(__file__).resolve().parents[2]).sites["site-a"]
    assert site.source is not None and site.source.database == "bench"
    assert site.resource_types == site_a.resource_types and site.identity == site_a.identity
    assert [(r.target, r.trigger) for r in site.routes] == [("central", "all")]
    assert config.capture_sites() == []  # no back-flow polling in the benchmark's workers
    [connector] = load_connectors(root / "connectors" / "debezium", config)  # checks the topic prefix
    assert connector.config["database.dbname"] == "bench"


def test_synthea_run_is_pinned_and_keyed_by_everything_that_changes_its_output() -> None:
    run = SyntheaRun(seed=1, population=3)
    assert synthea_version() == "3.3.0"
    assert run.key("3.3.0") != SyntheaRun(seed=2, population=3).key("3.3.0")
    args = run.arguments(Path("/tmp/out"))
    assert args[0] == "App" and args[1:3] == ["-s", "1"] and "-r" in args and "--exporter.fhir.export=true" in args


def test_memory_parts_are_read_from_the_worker_metrics_text() -> None:
    text = (
        "# HELP cdrsync_worker_memory_bytes Bytes the worker holds, by part\n"
        "# TYPE cdrsync_worker_memory_bytes gauge\n"
        'cdrsync_worker_memory_bytes{part="block_cache"} 1.6777216e+07\n'
        'cdrsync_worker_memory_bytes{part="heap_free"} 2048.0\n'
        'cdrsync_volume_used_bytes{volume="worker-state"} 9.0\n'
    )
    assert memory_parts(parse_metrics(text)) == {"block_cache": 16 * 1024 * 1024, "heap_free": 2048}


def _stage_metrics(buckets: dict[str, dict[str, float]]) -> str:
    """A worker's /metrics text with cdrsync_stage_seconds buckets: "stage/part" -> le -> cumulative count."""
    lines = ["# TYPE cdrsync_stage_seconds histogram"]
    for name, counts in buckets.items():
        stage, part = name.split("/")
        for le, count in counts.items():
            lines.append(f'cdrsync_stage_seconds_bucket{{le="{le}",part="{part}",stage="{stage}"}} {count}')
    return "\n".join(lines) + "\n"


def test_stage_times_count_only_the_records_taken_between_two_readings() -> None:
    before = stage_buckets(
        parse_metrics(
            _stage_metrics(
                {
                    "order/wait": {"0.001": 0, "0.002": 2, "0.005": 2, "+Inf": 2},
                    "sink/wait": {"0.001": 1, "0.002": 1, "0.005": 1, "+Inf": 1},
                }
            )
        )
    )
    after = stage_buckets(
        parse_metrics(
            _stage_metrics(
                {
                    "order/wait": {"0.001": 0, "0.002": 4, "0.005": 6, "+Inf": 6},
                    "sink/wait": {"0.001": 1, "0.002": 1, "0.005": 1, "+Inf": 1},
                }
            )
        )
    )
    times = stage_times(before, after)
    assert set(times) == {"order"}  # the sink took nothing in between
    order = times["order"]["wait"]
    assert order["count"] == 4  # two at up to 2 ms, two between 2 and 5 ms
    assert order["p50"] == pytest.approx(0.002)
    assert order["p99"] == pytest.approx(0.002 + 0.003 * (3.96 - 2) / 2)


def test_report_says_where_the_pipeline_s_changes_spent_their_time_by_stage() -> None:
    stages = {
        "sink": {"wait": {"count": 3, "p50": 0.004, "p99": 0.01}, "handle": {"count": 3, "p50": 0.0215, "p99": 0.05}},
        "normalize": {
            "wait": {"count": 3, "p50": 0.0098, "p99": 0.02},
            "handle": {"count": 3, "p50": 0.002, "p99": 0.003},
        },
    }
    results = {
        **_results(),
        "r3": {"1": {"pipeline": {"count": 3, "p50": 0.05, "p99": 0.06, "max": 0.07, "stages": stages}}},
    }
    text = format_report(results)
    assert (
        "R3  1/s pipeline by stage, p50 ms of wait + handle (cdrsync_stage_seconds): "
        "normalize 9.8 + 2.0, sink 4.0 + 21.5" in text
    )


def test_stage_load_reads_each_stage_s_records_batches_and_busy_time() -> None:
    text = (
        "# TYPE cdrsync_stage_seconds histogram\n"
        'cdrsync_stage_seconds_count{part="handle",stage="order"} 300\n'
        'cdrsync_stage_seconds_count{part="wait",stage="order"} 300\n'
        'cdrsync_stage_seconds_count{part="handle",stage="sink"} 0\n'
        "# TYPE cdrsync_stage_batches_total counter\n"
        'cdrsync_stage_batches_total{stage="order"} 12\n'
        'cdrsync_stage_batches_total{stage="sink"} 0\n'
        "# TYPE cdrsync_stage_busy_seconds_total counter\n"
        'cdrsync_stage_busy_seconds_total{stage="order"} 4.25\n'
        'cdrsync_stage_busy_seconds_total{stage="sink"} 0\n'
    )
    load = stage_load(parse_metrics(text))
    assert load == {"order": {"records": 300, "batches": 12, "busy_seconds": 4.25}}  # the sink took no batch


def test_report_says_how_busy_each_stage_was_during_r1() -> None:
    results = _results()
    results["r1"]["pipeline"]["drain_seconds"] = 20.0
    results["r1"]["pipeline"]["cpu"] = {
        "seconds": 21.0,
        "process_cpu_seconds": 16.8,
        "process_core_share": 0.8,
        "machine_busy_share": 0.955,
    }
    results["r1"]["pipeline"]["stages"] = {
        "sink": {"records": 10, "batches": 4, "busy_seconds": 15.0},
        "normalize": {"records": 10, "batches": 2, "busy_seconds": 1.0},
    }
    text = format_report(results)
    assert (
        "R1  by stage, busy s of the 20.0 s drain, batches x records per batch: "
        "normalize 1.0 s (5 %), 2 x 5.0; sink 15.0 s (75 %), 4 x 2.5" in text
    )
    assert (
        "R1  from ready to drained (21.0 s) the worker used 16.8 CPU s (80 % of one core); the machine's cores were "
        "96 % busy" in text
    )


def test_cpu_use_between_two_readings() -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    before = CpuReading(at=100.0, process=0, machine_busy=1000, machine_total=5000)
    after = CpuReading(at=110.0, process=5 * ticks, machine_busy=2500, machine_total=7000)
    use = cpu_use(before, after)
    assert use == {
        "seconds": 10.0,
        "process_cpu_seconds": 5.0,
        "process_core_share": 0.5,
        "machine_busy_share": 0.75,  # 1500 of the 2000 ticks that passed on all cores
    }
    reading = read_cpu(os.getpid())  # this process, from /proc
    assert reading.process > 0 and 0 < reading.machine_busy < reading.machine_total


def test_the_naive_loop_counts_what_waits_for_a_failed_write_as_failed_instead_of_waiting_for_it() -> None:
    class Refusing:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def send(self, method: str, ref: str, body: bytes | None) -> int:
            self.sent.append(ref)
            return 500 if ref.startswith("Patient/") else 201

    person = routed_record(patient("naive-p"), patient_key="k")
    observations = [
        dataclasses.replace(
            routed_record(observation_for(f"naive-o{n}", "naive-p", n, 1.0), patient_key="k"),
            dependencies=[person.target_ref],
        )
        for n in range(2)
    ]
    result = NaiveResult()
    target = Refusing()
    writer = _Writer(target, result)  # type: ignore[arg-type]
    for observation in observations:
        writer.offer(observation)  # their patient is not written yet: they wait
    assert writer.deferred == 2 and target.sent == []
    writer.offer(person)  # refused by the server
    assert writer.deferred == 0  # nothing left that the loop would wait for
    assert (result.writes, result.failed) == (0, 3)
    assert target.sent == [person.target_ref]


def test_the_harness_hears_at_once_when_the_naive_loop_fails_instead_of_waiting_out_its_timeout(
    tmp_path: Path,
) -> None:
    run = NaiveRun(
        str(tmp_path / "no-such-config"), "site-a", "127.0.0.1:1", "t", {0: 0}, "http://127.0.0.1:1/fhir", "g"
    )
    loop = start_naive_loop(run)
    with pytest.raises(RuntimeError, match=r"the naive loop failed: .*no-such-config"):
        loop.finish({0: 1}, timeout=60)
    assert not loop.process.is_alive()


def test_the_harness_gives_up_on_a_naive_loop_that_makes_no_progress_and_says_how_far_it_got() -> None:
    root = Path(__file__).resolve().parents[2]  # the repository's sites/: nothing on the broker's port
    run = NaiveRun(str(root), "site-a", "127.0.0.1:1", "t", {0: 0}, "http://127.0.0.1:1/fhir", "g")
    loop = start_naive_loop(run)
    with pytest.raises(TimeoutError, match=r"made no progress for 8s; 0 records polled, .* still to poll: 5"):
        loop.finish({0: 5}, timeout=60, stall=8.0)  # a heartbeat comes every 5 s; it never moves
    assert not loop.process.is_alive()
