"""Percentiles, the goals of issue 7 with their measured values, and the plain-text table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Goal", "evaluate_goals", "format_report", "percentile", "summarize"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolated linearly between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """Count, p50, p95, p99 and max of latencies in seconds (empty: count 0 only)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "p50": round(percentile(values, 50), 4),
        "p95": round(percentile(values, 95), 4),
        "p99": round(percentile(values, 99), 4),
        "max": round(max(values), 4),
    }


@dataclass(frozen=True)
class Goal:
    """One goal: what it asks, its measured value, and whether it holds (None: not measured)."""

    name: str
    target: str
    measured: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "incomplete" if self.measured != "-" else "not run"
        return "PASS" if self.passed else "FAIL"


def _get(results: dict[str, Any], *path: str) -> Any:
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    return node


_P50_AT_1_LIMIT = 1.2  # R3's p50 at 1/s: at most this times the naive loop's


def _leaves_ms(naive50: float) -> float:
    """What R3's 1/s goal leaves the pipeline's work beyond the naive loop's, in ms: the p50 allowed less the
    naive loop's own."""
    return (_P50_AT_1_LIMIT - 1) * naive50 * 1000


def evaluate_goals(results: dict[str, Any]) -> list[Goal]:
    """The five goals of issue 7 from a run's results (any part may be missing)."""
    goals = []
    r1 = _get(results, "r1", "ratio")
    goals.append(Goal("R1 pipeline drain ratio", ">= 0.25", _fmt(r1, "{:.4f}"), None if r1 is None else r1 >= 0.25))
    r2 = _get(results, "r2", "ratio")
    goals.append(Goal("R2 sink ratio", ">= 10", _fmt(r2, "{:.2f}"), None if r2 is None else r2 >= 10))
    pipe99, naive99 = _get(results, "r3", "50", "pipeline", "p99"), _get(results, "r3", "50", "naive", "p99")
    goals.append(_ratio_goal("R3 p99 at 50/s, pipeline / naive", 0.5, pipe99, naive99))
    pipe50, naive50 = _get(results, "r3", "1", "pipeline", "p50"), _get(results, "r3", "1", "naive", "p50")
    goals.append(_ratio_goal("R3 p50 at 1/s, pipeline / naive", _P50_AT_1_LIMIT, pipe50, naive50))
    goals.append(_memory_goal(results.get("memory")))
    return goals


def _memory_goal(memory: dict[str, Any] | None) -> Goal:
    name = "Memory growth 10k -> 100k patients"
    growth = (memory or {}).get("growth_percent")
    if memory is None or growth is None:
        return Goal(name, "< 10 %", "-", None)
    if not memory.get("complete"):  # the pipeline did not reach the second step within the time budget
        low, high = memory["growth_between"]
        return Goal(name, "< 10 %", f"{growth:+.1f} % ({low} -> {high} only)", None)
    return Goal(name, "< 10 %", f"{growth:+.1f} %", growth < 10)


def _ratio_goal(name: str, limit: float, pipeline: float | None, naive: float | None) -> Goal:
    if pipeline is None or naive is None:
        return Goal(name, f"<= {limit}", "-", None)
    ratio = pipeline / naive if naive > 0 else math.inf
    measured = f"{ratio:.2f} ({pipeline * 1000:.0f} ms / {naive * 1000:.0f} ms)"
    return Goal(name, f"<= {limit}", measured, ratio <= limit)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def format_report(results: dict[str, Any]) -> str:
    """The goals table, then the absolute figures and the machine they came from."""
    goals = evaluate_goals(results)
    width = max(len(g.name) for g in goals)
    lines = [f"{'goal':<{width}}  {'target':<8}  {'measured':<28}  result", "-" * (width + 48)]
    lines += [f"{g.name:<{width}}  {g.target:<8}  {g.measured:<28}  {g.verdict}" for g in goals]
    lines += ["", *_figures(results), "", _machine_line(results.get("machine") or {})]
    return "\n".join(lines)


def _figures(results: dict[str, Any]) -> list[str]:
    lines = []
    if r1 := results.get("r1"):
        lines.append(
            f"R1  {r1['resources']} resources: pipeline {r1['pipeline']['per_second']}/s "
            f"(steady {r1['pipeline']['steady_per_second']}/s, "
            f"ready after {r1['pipeline']['worker_ready_seconds']} s), "
            f"raw consume(500) {r1['raw']['per_second']}/s"
        )
        if validation := r1.get("validation_alone"):
            lines.append(_validation_line(validation))
        if relay := r1.get("faust_alone"):
            lines.append(_relay_line(relay, r1["pipeline"].get("per_second")))
        if written := r1["pipeline"].get("records_written"):
            lines.append(_written_line(written, r1["pipeline"]["count"]))
        if stages := r1["pipeline"].get("stages"):
            lines.append(_load_line(stages, r1["pipeline"].get("drain_seconds")))
        if cpu := r1["pipeline"].get("cpu"):
            lines.append(
                f"R1  from ready to drained ({cpu['seconds']:.1f} s) the worker used {cpu['process_cpu_seconds']:.1f} "
                f"CPU s ({100 * cpu['process_core_share']:.0f} % of one core); the machine's cores were "
                f"{100 * cpu['machine_busy_share']:.0f} % busy"
            )
    if r2 := results.get("r2"):
        lines.append(
            f"R2  {r2['resources']} resources into the FHIR server: pipeline {r2['pipeline']['per_second']}/s, "
            f"naive loop {r2['naive']['per_second']}/s"
        )
        if ceiling := r2.get("server_ceiling"):
            lines.append(
                f"R2  the server alone (bundles of {ceiling['bundle_size']} PUTs, one at a time, nothing else): "
                f"{ceiling['per_second']}/s = {ceiling['ratio_to_naive']} x the naive loop, "
                "the largest R2 such a writer reaches here"
            )
    for rate, r3 in sorted((results.get("r3") or {}).items(), key=lambda kv: float(kv[0])):
        for mode in ("pipeline", "naive"):
            s = r3.get(mode) or {}
            if s.get("count"):
                lines.append(
                    f"R3  {rate}/s {mode:<8} {s['count']} changes: p50 {s['p50'] * 1000:.0f} ms, "
                    f"p99 {s['p99'] * 1000:.0f} ms, max {s['max'] * 1000:.0f} ms"
                )
        if stages := (r3.get("pipeline") or {}).get("stages"):
            lines.append(_stage_line(rate, stages))
        lines += _capture_lines(rate, r3)
    if (floor := results.get("hop_floor")) and floor["hop"].get("count"):
        lines += _hop_floor_lines(floor, _get(results, "r3", "1", "naive", "p50"))
    if (floor := results.get("aiokafka_hop_floor")) and floor["hop"].get("count"):
        lines.append(_aiokafka_hop_line(floor, _get(results, "r3", "1", "naive", "p50")))
    if floor := results.get("faust_hop_floor"):
        lines.append(_faust_hop_line(floor, _get(results, "r3", "1", "naive", "p50")))
    if memory := results.get("memory"):
        points = ", ".join(f"{p['patients']} patients {p['rss_mib']} MiB" for p in memory.get("points", []))
        lines.append(f"Memory  worker RSS: {points}")
        for point in memory.get("points", []):
            if parts := point.get("parts_mib"):
                named = ", ".join(f"{part} {mib}" for part, mib in parts.items())
                lines.append(f"        at {point['patients']} patients, MiB by part: {named}")
    if profile := _get(results, "r1", "profile"):
        lines += _profile_lines(profile)
    return lines


_STAGES = ("normalize", "identity", "order", "sink", "audit")


def _stage_line(rate: str, stages: dict[str, dict[str, dict[str, float]]]) -> str:
    """Where the pipeline's changes spent their time in the worker at one rate: p50 wait + handle by stage."""
    parts = []
    for stage in sorted(stages, key=lambda s: (_STAGES.index(s) if s in _STAGES else len(_STAGES), s)):
        wait, handle = stages[stage].get("wait"), stages[stage].get("handle")
        if wait and handle:
            parts.append(f"{stage} {wait['p50'] * 1000:.1f} + {handle['p50'] * 1000:.1f}")
    return f"R3  {rate}/s pipeline by stage, p50 ms of wait + handle (cdrsync_stage_seconds): " + ", ".join(parts)


def _load_line(stages: dict[str, dict[str, float]], drain: float | None) -> str:
    """What each stage did during R1's drain: its busy time (and share of the drain), batches and batch size."""
    parts = []
    for stage in sorted(stages, key=lambda s: (_STAGES.index(s) if s in _STAGES else len(_STAGES), s)):
        load = stages[stage]
        busy, batches, records = load.get("busy_seconds", 0.0), load.get("batches", 0.0), load.get("records", 0.0)
        share = f" ({100 * busy / drain:.0f} %)" if drain else ""
        parts.append(f"{stage} {busy:.1f} s{share}, {batches:.0f} x {records / batches if batches else 0:.1f}")
    head = f"busy s of the {drain:.1f} s drain" if drain else "busy s"
    return f"R1  by stage, {head}, batches x records per batch: " + "; ".join(parts)


def _validation_line(validation: dict[str, Any]) -> str:
    check, mapped, cores = validation["validate"], validation["normalize_change"], validation.get("cores", 1)
    every_core = ""
    if cores > 1 and check["ratio_to_raw"] is not None:
        every_core = f", {cores * check['ratio_to_raw']:.2f} x with all {cores} cores validating, nothing else running"
    return (
        f"R1  validation alone (fhir.resources on each of R1's resources, one after the other, nothing read or "
        f"written): {check['per_second']}/s = {check['ratio_to_raw']} x the raw loop, the largest R1 a worker process "
        f"that validates every record reaches here{every_core}; the project's normalize_change alone: "
        f"{mapped['per_second']}/s = {mapped['ratio_to_raw']} x"
    )


def _relay_line(relay: dict[str, Any], pipeline: float | None) -> str:
    if "error" in relay:
        return f"R1  Faust alone: not measured ({relay['error']})"
    against = f"; the pipeline's rate is {pipeline / relay['per_second']:.2f} of it" if pipeline else ""
    steady = f"steady {relay['steady_per_second']}/s, " if relay.get("steady_per_second") else ""
    cpu = relay["cpu"]
    return (
        f"R1  Faust alone (one worker process relaying R1's records through {relay['hops']} topics of "
        f"{relay['partitions']} partitions in batches, acks=all, nothing decoded, validated or kept): "
        f"{relay['per_second']}/s ({steady}{cpu['process_cpu_seconds']:.1f} CPU s, "
        f"{100 * cpu['process_core_share']:.0f} % of one core) = {relay['ratio_to_raw']} x the raw loop, the most "
        f"R1 a worker process of Faust agents with DESIGN.md's topics reaches here{against}"
    )


def _written_line(written: dict[str, int], resources: int) -> str:
    """The Kafka records the worker wrote during R1, per resource: in all and by topic, most first."""
    total = sum(written.values())
    most_first = sorted(written.items(), key=lambda kv: (-kv[1], kv[0]))
    by_topic = ", ".join(f"{topic} {count / resources:.2f}" for topic, count in most_first if count)
    return f"R1  records the worker wrote to Kafka: {total / resources:.2f} per resource ({by_topic})"


def _capture_lines(rate: str, r3: dict[str, Any]) -> list[str]:
    """Debezium's part of R3 at one rate (commit to its record in Kafka), and for the p99 goal's rate, what the
    goal leaves the pipeline against it."""
    capture = (r3.get("pipeline") or {}).get("capture") or (r3.get("naive") or {}).get("capture") or {}
    if not capture.get("count"):
        return []
    lines = [
        f"R3  {rate}/s capture alone (commit to Debezium's record in Kafka, which every reader waits for), "
        f"{capture['count']} changes: p50 {capture['p50'] * 1000:.0f} ms, p99 {capture['p99'] * 1000:.0f} ms"
    ]
    naive99 = (r3.get("naive") or {}).get("p99")
    if rate == "50" and naive99:
        lines.append(
            f"R3  at 50/s the goal asks the pipeline's p99 to be {0.5 * naive99 * 1000:.0f} ms at most (0.5 x the "
            f"naive loop's); the capture alone takes {capture['p99'] * 1000:.0f} ms at p99 before any reader has "
            "the change"
        )
    return lines


def _hop_line(floor: dict[str, Any], how: str) -> str:
    """A hop floor's figures: one hop's p50 and p99, and the chain's p50; `how` says which client relayed."""
    hop, chain = floor["hop"], floor["chain"]
    return (
        f"R3  one Kafka hop alone {how} at {floor['rate']:g}/s, {hop['count']} hops: p50 {hop['p50'] * 1000:.1f} ms, "
        f"p99 {hop['p99'] * 1000:.1f} ms; {floor['hops']} in a row: p50 {chain['p50'] * 1000:.1f} ms"
    )


def _aiokafka_hop_line(floor: dict[str, Any], naive50: float | None) -> str:
    leaves = f" (the 1/s goal leaves the pipeline's extra topics {_leaves_ms(naive50):.1f} ms)" if naive50 else ""
    return _hop_line(floor, "through aiokafka (the client Faust is built on, acks=all, linger 0)") + leaves


def _faust_hop_line(floor: dict[str, Any], naive50: float | None) -> str:
    if "error" in floor or not floor["chain"].get("count"):
        return (
            f"R3  the extra topics through Faust alone: not measured ({floor.get('error', 'no record came through')})"
        )
    chain = floor["chain"]
    unseen = f", {floor['unseen']} not through in time" if floor.get("unseen") else ""
    leaves = f" (the 1/s goal leaves them {_leaves_ms(naive50):.1f} ms)" if naive50 else ""
    return (
        f"R3  {floor['hops']} topics through Faust alone (a Faust app relaying one record at a time, acks=all) at "
        f"{floor['rate']:g}/s, {chain['count']} records: p50 {chain['p50'] * 1000:.1f} ms, "
        f"p99 {chain['p99'] * 1000:.1f} ms{unseen}{leaves}"
    )


def _hop_floor_lines(floor: dict[str, Any], naive50: float | None) -> list[str]:
    chain, hops = floor["chain"], floor["hops"]
    lines = [_hop_line(floor, "(a C client relaying, acks=all, linger 0)")]
    if naive50:
        lines.append(
            f"R3  the pipeline crosses {hops} topics more than the naive loop; at 1/s the goal leaves them "
            f"{_leaves_ms(naive50):.1f} ms ({_P50_AT_1_LIMIT - 1:.1f} x the naive loop's p50), and {hops} hops "
            f"alone take {chain['p50'] * 1000:.1f} ms"
        )
    return lines


def _profile_lines(profile: dict[str, Any]) -> list[str]:
    if "error" in profile:
        return [f"Profile  not taken: {profile['error']}"]
    lines = [f"Profile  worker during R1, {profile['samples']} samples; top ten by own time, then by total time:"]
    lines += [f"  own   {row['percent']:5.1f} %  {row['function']}" for row in profile["top_own"]]
    lines += [f"  total {row['percent']:5.1f} %  {row['function']}" for row in profile["top_total"]]
    return lines


def _machine_line(machine: dict[str, Any]) -> str:
    if not machine:
        return ""
    return (
        f"Machine  {machine.get('cpu_model')}, {machine.get('cores')} cores, {machine.get('memory_gib')} GiB, "
        f"kernel {machine.get('kernel')}, Python {machine.get('python')}, {machine.get('java')}, "
        f"{machine.get('fhir_server')}, Kafka {machine.get('kafka')}; load average at start "
        f"{machine.get('load_start')}, at end {machine.get('load_end')}; {machine.get('date')}, "
        f"commit {machine.get('git_commit')}"
    )
