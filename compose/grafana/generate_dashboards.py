"""Writes compose/grafana/dashboards/*.json: the five cdrsync dashboards, as code.

    .venv/bin/python compose/grafana/generate_dashboards.py

Edit this file, not the JSON: tests/unit/test_dashboards.py fails when the JSON differs from what this writes,
and when a query names a metric that neither the workers nor `cdrsync monitor` export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "cdrsync-prometheus"}
ROUTE = "{{site}} → {{target}}"
GREEN_YELLOW_RED = [("green", None), ("yellow", 300), ("red", 900)]


def _thresholds(steps: list[tuple[str, float | None]]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def panel(
    title: str,
    *queries: tuple[str, str],
    kind: str = "timeseries",
    unit: str = "short",
    width: int = 12,
    height: int = 8,
    thresholds: list[tuple[str, float | None]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """One panel; queries are (PromQL, legend)."""
    defaults: dict[str, Any] = {"unit": unit}
    if thresholds:
        defaults["thresholds"] = _thresholds(thresholds)
        defaults["color"] = {"mode": "thresholds"}
    if mappings:
        defaults["mappings"] = mappings
    result: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(queries)
        ],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {},
    }
    if kind == "stat":
        result["options"] = {
            "colorMode": "background",
            "graphMode": "none",
            "reduceOptions": {"calcs": ["lastNotNull"]},
        }
    if kind == "heatmap":
        result["targets"][0]["format"] = "heatmap"
        result["options"] = {"calculate": False, "yAxis": {"unit": unit}}
    return result


def row(title: str) -> dict[str, Any]:
    """A row header across the dashboard."""
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"w": 24, "h": 1}, "panels": []}


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]] | None = None
) -> dict:
    """A dashboard; panels are laid out left to right, top to bottom."""
    x = y = row_height = 0
    for number, item in enumerate(panels, start=1):
        grid = item["gridPos"]
        if x + grid["w"] > 24 or item["type"] == "row":
            x, y, row_height = 0, y + row_height, 0
        grid.update({"x": x, "y": y})
        item["id"] = number
        x += grid["w"]
        row_height = max(row_height, grid["h"])
    return {
        "uid": uid,
        "title": title,
        "tags": ["cdrsync"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "browser",
        "templating": {"list": variables or []},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": ["cdrsync"], "title": "cdrsync", "asDropdown": True}],
        "panels": panels,
    }


def site_variable() -> dict[str, Any]:
    """$site: one hospital, from the configured routes."""
    return {
        "name": "site",
        "label": "Hospital",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(cdrsync_route_info, site)", "refId": "site"},
        "definition": "label_values(cdrsync_route_info, site)",
        "refresh": 2,
        "current": {},
    }


RUNNING = [
    {"type": "value", "options": {"1": {"text": "RUNNING", "color": "green"}, "0": {"text": "DOWN", "color": "red"}}}
]
UP = [{"type": "value", "options": {"1": {"text": "UP", "color": "green"}, "0": {"text": "DOWN", "color": "red"}}}]
LATENCY = "histogram_quantile({q}, sum by ({by}le) (rate(cdrsync_end_to_end_latency_seconds_bucket{sel}[5m])))"


def stage_time(q: float) -> str:
    """The q-quantile of a record's time at each stage, by part (wait, handle), over 5 minutes."""
    return f"histogram_quantile({q}, sum by (stage, part, le) (rate(cdrsync_stage_seconds_bucket[5m])))"


def latency(q: float, by: str = "", sel: str = "") -> str:
    """The q-quantile of end-to-end latency over 5 minutes."""
    return LATENCY.format(q=q, by=f"{by}, " if by else "", sel=sel)


def sync_overview() -> dict:
    return dashboard(
        "cdrsync-sync-overview",
        "cdrsync / Sync Overview",
        [
            panel(
                "Time since the last successful write, per route",
                ("time() - cdrsync:route_last_success_timestamp_seconds", ROUTE),
                kind="stat",
                unit="s",
                width=24,
                height=5,
                thresholds=GREEN_YELLOW_RED,
                description="Green under 5 min, yellow under 15 min, red from 15 min (the SLA; SyncStale fires "
                "when changes are also pending).",
            ),
            panel(
                "Changes pending per hospital (unread, or read in the last 15 min)",
                ("cdrsync:site_pending_changes", "{{site}}"),
                kind="stat",
                width=8,
                height=5,
            ),
            panel(
                "Debezium connectors",
                ('max by (site, connector) (cdrsync_connector_state{state="RUNNING"})', "{{connector}}"),
                kind="stat",
                width=8,
                height=5,
                mappings=RUNNING,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "Firing alerts",
                ('count(ALERTS{alertstate="firing"}) or vector(0)', "firing"),
                kind="stat",
                width=8,
                height=5,
                thresholds=[("green", None), ("red", 1)],
            ),
            panel(
                "Writes per second, per route",
                ('sum by (site, target) (rate(cdrsync_writes_total{result="succeeded"}[5m]))', ROUTE),
                unit="ops",
            ),
            panel("End-to-end latency p95, per route", (latency(0.95, "site, target"), ROUTE), unit="s"),
        ],
    )


def pipeline_health() -> dict:
    return dashboard(
        "cdrsync-pipeline-health",
        "cdrsync / Pipeline Health",
        [
            row("Sources"),
            panel(
                "Debezium connector state",
                ('max by (site, connector) (cdrsync_connector_state{state="RUNNING"})', "{{connector}}"),
                kind="stat",
                width=8,
                height=5,
                mappings=RUNNING,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "Connector tasks not running",
                ('sum by (site, connector) (cdrsync_connector_tasks{state!="RUNNING"})', "{{connector}}"),
                kind="stat",
                width=8,
                height=5,
                thresholds=[("green", None), ("red", 1)],
            ),
            panel(
                "Replication slot attached",
                ("cdrsync_replication_slot_active", "{{site}} {{slot}}"),
                kind="stat",
                width=8,
                height=5,
                mappings=UP,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "WAL kept by each replication slot",
                ("cdrsync_replication_slot_retained_wal_bytes", "{{site}} retained"),
                ("cdrsync_replication_slot_lag_bytes", "{{site}} not yet confirmed"),
                unit="bytes",
                description="ReplicationSlotWalHigh fires above 1 GiB retained.",
            ),
            panel(
                "Consumer lag per topic",
                ("sum by (group, topic) (cdrsync_consumer_lag_records)", "{{group}} {{topic}}"),
            ),
            row("Workers"),
            panel(
                "End-to-end latency p50 / p95 / p99",
                (latency(0.5), "p50"),
                (latency(0.95), "p95"),
                (latency(0.99), "p99"),
                unit="s",
            ),
            panel(
                "End-to-end latency distribution",
                ("sum by (le) (increase(cdrsync_end_to_end_latency_seconds_bucket[5m]))", "{{le}}"),
                kind="heatmap",
                unit="s",
            ),
            panel(
                "Workers ready (/readyz)",
                ("cdrsync_ready", "{{instance}}"),
                kind="stat",
                width=6,
                height=5,
                mappings=UP,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "Targets answering",
                ("max by (target) (cdrsync_target_up)", "{{target}}"),
                kind="stat",
                width=6,
                height=5,
                mappings=UP,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "Worker starts (10 min)",
                ('changes(process_start_time_seconds{job="cdrsync-worker"}[10m])', "{{instance}}"),
                kind="stat",
                width=6,
                height=5,
                thresholds=[("green", None), ("yellow", 1), ("red", 4)],
            ),
            panel(
                "Volume used",
                (
                    "cdrsync_volume_used_bytes / (cdrsync_volume_used_bytes + cdrsync_volume_available_bytes)",
                    "{{instance}} {{volume}}",
                ),
                kind="stat",
                unit="percentunit",
                width=6,
                height=5,
                thresholds=[("green", None), ("yellow", 0.7), ("red", 0.8)],
            ),
            panel(
                "Worker memory by part",
                ('process_resident_memory_bytes{job="cdrsync-worker"}', "{{instance}} resident"),
                ("cdrsync_worker_memory_bytes", "{{instance}} {{part}}"),
                unit="bytes",
                description="resident: what the system counts against the worker. The parts: the C heap in use, in "
                "blocks of their own and free but kept; RocksDB's shared block cache (memtables charged to it "
                "included), memtables and table readers. State grows on disk, not here: a resident figure that "
                "climbs while these parts stay flat points at the heap's free memory.",
            ),
            panel(
                "Records taken per second, by stage",
                ('sum by (stage) (rate(cdrsync_stage_seconds_count{part="wait"}[5m]))', "{{stage}}"),
                unit="ops",
            ),
            panel(
                "Sink transaction bundles",
                ("sum by (target, result) (rate(cdrsync_bundles_total[5m]))", "{{target}} {{result}}"),
                unit="ops",
                description="applied: one patient's upserts written in one transaction; split: refused as a whole, "
                "then written one at a time so each failure is routed on its own.",
            ),
            panel(
                "Monitor: sources answering, time to ask",
                ("cdrsync_monitor_collect_success", "{{collector}} ok"),
                ("cdrsync_monitor_collect_duration_seconds", "{{collector}} seconds"),
            ),
            panel(
                "Time per stage: wait and handle, p50 / p99",
                (stage_time(0.5), "p50 {{stage}} {{part}}"),
                (stage_time(0.99), "p99 {{stage}} {{part}}"),
                unit="s",
                width=24,
                description="cdrsync_stage_seconds. wait: from a record's Kafka timestamp to its stage taking it "
                "(the producer, the broker, the fetch, the hand-over inside the worker, and any lag). handle: from "
                "then until its batch is done (outputs acknowledged by Kafka, tables applied, writes answered). A "
                "stage whose wait grows is behind; one whose handle grows is slow itself.",
            ),
            panel(
                "Stage busy share",
                ("sum by (stage) (rate(cdrsync_stage_busy_seconds_total[5m]))", "{{stage}}"),
                unit="percentunit",
                description="cdrsync_stage_busy_seconds_total: the share of the time each stage spent handling "
                "batches. A stage near 100 % is the one the others wait for; one far below it waits for its input.",
            ),
            panel(
                "Records per batch, by stage",
                (
                    'sum by (stage) (rate(cdrsync_stage_seconds_count{part="handle"}[5m])) / '
                    "sum by (stage) (rate(cdrsync_stage_batches_total[5m]))",
                    "{{stage}}",
                ),
                description="Records a stage took at once (cdrsync_stage_seconds_count over "
                "cdrsync_stage_batches_total): 1 when the pipeline is quiet, growing with the load.",
            ),
        ],
    )


def error_analysis() -> dict:
    return dashboard(
        "cdrsync-error-analysis",
        "cdrsync / Error Analysis",
        [
            panel(
                "Failed write attempts per second, by error class",
                ('sum by (error_class) (rate(cdrsync_writes_total{result="failed"}[5m]))', "{{error_class}}"),
                unit="ops",
            ),
            panel(
                "Share of failed write attempts, per route (10 min)",
                (
                    'sum by (site, target) (rate(cdrsync_writes_total{result="failed"}[10m]))'
                    " / sum by (site, target) (rate(cdrsync_writes_total[10m]))",
                    ROUTE,
                ),
                unit="percentunit",
                thresholds=[("green", None), ("red", 0.05)],
            ),
            panel(
                "Records sent to retry tiers (per hour), by tier and error class",
                ("sum by (tier, error_class) (increase(cdrsync_retries_total[1h]))", "tier {{tier}} {{error_class}}"),
            ),
            panel(
                "Records waiting in retry tiers",
                ('sum by (topic) (cdrsync_consumer_lag_records{kind="retry"})', "{{topic}}"),
            ),
            panel(
                "Dead letters (per hour), by stage and error class",
                (
                    "sum by (stage, site, error_class) (increase(cdrsync_dead_letters_total[1h]))",
                    "{{site}} {{stage}} {{error_class}}",
                ),
            ),
            panel(
                "Dead-letter topic depth",
                ('sum(cdrsync_topic_records{kind="dlq"})', "records"),
                kind="stat",
                width=6,
                height=8,
                thresholds=[("green", None), ("yellow", 1)],
            ),
            panel(
                "Conflicts and identity reviews (per hour)",
                ("sum by (site) (increase(cdrsync_conflicts_total[1h]))", "conflicts {{site}}"),
                ("sum by (site) (increase(cdrsync_identity_reviews_total[1h]))", "identity reviews {{site}}"),
                (
                    "sum by (site, action) (increase(cdrsync_identity_decisions_total[1h]))",
                    "identity reviews closed {{site}} {{action}}",
                ),
                (
                    "sum by (site, outcome) (increase(cdrsync_identity_moves_total[1h]))",
                    "records moved {{site}} {{outcome}}",
                ),
                width=6,
            ),
            panel(
                "Tumour-board trigger and back-flow (per hour)",
                (
                    "sum by (site, outcome) (increase(cdrsync_trigger_selections_total[1h]))",
                    "trigger {{site}} {{outcome}}",
                ),
                ("sum by (target, outcome) (increase(cdrsync_backflow_total[1h]))", "back-flow {{target}} {{outcome}}"),
                ("sum by (site, result) (increase(cdrsync_capture_polls_total[1h]))", "capture {{site}} {{result}}"),
                description="trigger: sent / backfilled / held (no active tumour-board flag); back-flow: captured, "
                "written_back, failed, no_hospital, echo_suppressed.",
            ),
            panel(
                "Back-flow waiting, by hospital",
                ("sum by (target) (cdrsync_writeback_waiting)", "{{target}}"),
                description="central changes read for a hospital and not yet written there: grows while the hospital "
                "is held unreachable (the other hospitals' lanes go on).",
            ),
            panel(
                "Normalize failures (per hour), by site",
                ('sum by (site) (increase(cdrsync_normalized_total{outcome="failed"}[1h]))', "{{site}}"),
            ),
            panel(
                "Target probe status code",
                ("cdrsync_target_probe_status_code", "{{target}}"),
                description="0: not reachable; 401/403 fire TargetAuthFailure; 5xx fire TargetUnreachable.",
            ),
        ],
    )


def resource_breakdown() -> dict:
    return dashboard(
        "cdrsync-resource-breakdown",
        "cdrsync / Resource Breakdown",
        [
            panel(
                "Writes per second, by resource type",
                ('sum by (resource_type) (rate(cdrsync_writes_total{result="succeeded"}[5m]))', "{{resource_type}}"),
                unit="ops",
            ),
            panel(
                "End-to-end latency p95, by resource type",
                (latency(0.95, "resource_type"), "{{resource_type}}"),
                unit="s",
            ),
            panel(
                "Failed write attempts per second, by resource type",
                ('sum by (resource_type) (rate(cdrsync_writes_total{result="failed"}[5m]))', "{{resource_type}}"),
                unit="ops",
            ),
            panel(
                "Source changes per second, by resource type and outcome",
                (
                    "sum by (resource_type, outcome) (rate(cdrsync_normalized_total[5m]))",
                    "{{resource_type}} {{outcome}}",
                ),
                unit="ops",
            ),
            panel(
                "Parked for a reference (per hour), by resource type",
                ("sum by (resource_type) (increase(cdrsync_parked_total[1h]))", "{{resource_type}}"),
            ),
            panel(
                "Held for a shared identifier (per hour), by resource type",
                ("sum by (resource_type) (increase(cdrsync_held_total[1h]))", "{{resource_type}}"),
            ),
            panel(
                "Writes in the last 24 h, by resource type",
                (
                    'sum by (resource_type) (increase(cdrsync_writes_total{result="succeeded"}[24h]))',
                    "{{resource_type}}",
                ),
                kind="bargauge",
                width=24,
            ),
        ],
    )


def per_hospital() -> dict:
    site = '{site="$site"}'
    return dashboard(
        "cdrsync-per-hospital",
        "cdrsync / Per Hospital",
        [
            panel(
                "Time since the last successful write",
                (f"time() - cdrsync:route_last_success_timestamp_seconds{site}", "→ {{target}}"),
                kind="stat",
                unit="s",
                width=6,
                height=5,
                thresholds=GREEN_YELLOW_RED,
            ),
            panel(
                "Pending changes",
                (f"cdrsync:site_pending_changes{site}", "pending"),
                kind="stat",
                width=6,
                height=5,
            ),
            panel(
                "Debezium connector",
                ('max by (connector) (cdrsync_connector_state{site="$site",state="RUNNING"})', "{{connector}}"),
                kind="stat",
                width=6,
                height=5,
                mappings=RUNNING,
                thresholds=[("red", None), ("green", 1)],
            ),
            panel(
                "Held now",
                (f"sum by (reason) (cdrsync_held_records{site})", "{{reason}}"),
                kind="stat",
                width=6,
                height=5,
                thresholds=[("green", None), ("yellow", 1)],
            ),
            panel(
                "Writes per second",
                (
                    'sum by (target) (rate(cdrsync_writes_total{site="$site",result="succeeded"}[5m]))',
                    "→ {{target}}",
                ),
                (
                    'sum by (target) (rate(cdrsync_writes_total{site="$site",result="failed"}[5m]))',
                    "failed → {{target}}",
                ),
                unit="ops",
            ),
            panel(
                "End-to-end latency",
                (latency(0.5, "target", site), "p50 → {{target}}"),
                (latency(0.99, "target", site), "p99 → {{target}}"),
                unit="s",
            ),
            panel("Unread changes (source topic lag)", (f"sum(cdrsync_consumer_lag_records{site})", "lag")),
            panel(
                "Replication slot WAL",
                (f"cdrsync_replication_slot_retained_wal_bytes{site}", "{{slot}}"),
                unit="bytes",
            ),
            panel(
                "Held for the shared identifier, and released (per hour)",
                (f"sum(increase(cdrsync_held_total{site}[1h]))", "held"),
                (f"sum(increase(cdrsync_held_released_total{site}[1h]))", "released"),
            ),
            panel(
                "Retries, dead letters and conflicts (per hour)",
                (f"sum(increase(cdrsync_retries_total{site}[1h]))", "retries"),
                (f"sum(increase(cdrsync_dead_letters_total{site}[1h]))", "dead letters"),
                (f"sum(increase(cdrsync_conflicts_total{site}[1h]))", "conflicts"),
            ),
        ],
        [site_variable()],
    )


DASHBOARDS = {
    "sync-overview": sync_overview,
    "pipeline-health": pipeline_health,
    "error-analysis": error_analysis,
    "resource-breakdown": resource_breakdown,
    "per-hospital": per_hospital,
}


def render() -> dict[str, str]:
    """File name → JSON text of every dashboard."""
    return {
        f"{name}.json": json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()
    }


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for file_name, text in render().items():
        (OUT / file_name).write_text(text, encoding="utf-8")
        print(f"wrote {OUT / file_name}")
