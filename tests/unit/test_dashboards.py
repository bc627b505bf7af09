"""Grafana dashboards and alert rules name only metrics the code exports, and every exported metric is used.

Grafana cannot run here, so this is the check that a dashboard does not silently show "No data": every
metric name in every PromQL expression (dashboard panels, template variables, alert and recording rules)
must be one the workers (pipeline.metrics, the process collector), `cdrsync monitor`
(pipeline.monitor) or Prometheus itself (up, ALERTS) exports, or a recording rule defines.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.metrics import MetricWrapperBase

import pipeline.flowmetrics
import pipeline.metrics
from pipeline.config import Config
from pipeline.metrics import MemoryCollector, VolumeCollector
from pipeline.monitor import SourceCollector
from pipeline.settings import Settings
from tests.conftest import ROOT

pytestmark = pytest.mark.unit
GRAFANA = ROOT / "compose" / "grafana"
RULES = ROOT / "compose" / "prometheus" / "rules" / "cdrsync.rules.yml"
PROMETHEUS_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_KEYWORDS |= {"inf", "nan", "atan2"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[a-zA-Z_:][\w:]*(?![\w:])(\s*\()?")
_LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are neither functions, keywords nor labels."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        if match.group(1) is None and match.group(0) not in _KEYWORDS:
            names.add(match.group(0))
    return names


def _sample_names(families: Iterable[Metric]) -> set[str]:
    return {family.name + suffix for family in families for suffix in _SUFFIXES[family.type]}


def family_names(config: Config) -> dict[str, set[str]]:
    """Every metric family cdrsync itself exports → the sample names it can have."""
    families: list[Metric] = []
    for value in [*vars(pipeline.metrics).values(), *vars(pipeline.flowmetrics).values()]:
        if isinstance(value, MetricWrapperBase):
            families += value.describe()
    families += VolumeCollector({}).describe()
    families += MemoryCollector(dict).describe()
    families += SourceCollector(Settings(), config, []).describe()
    return {family.name: _sample_names([family]) for family in families}


def exported_names(config: Config) -> set[str]:
    """Every sample name a worker, the monitor or Prometheus can expose."""
    names = {name for samples in family_names(config).values() for name in samples}
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    names |= {sample.name for family in registry.collect() for sample in family.samples}
    return names | PROMETHEUS_BUILTINS


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every dashboard query, template variables included."""
    found = []
    for name, board in dashboards().items():
        for panel in _panels(board["panels"]):
            found += [(f"{name}: {panel['title']}", t["expr"]) for t in panel.get("targets", [])]
        for variable in board["templating"]["list"]:
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found += [(f"{name}: ${variable['name']}", m) for m in _LABEL_VALUES.findall(query)]
    return found


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def rule_expressions() -> list[tuple[str, str]]:
    return [(f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]) for rule in rules()]


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (site, le) "
        '(rate(cdrsync_end_to_end_latency_seconds_bucket{site="$site"}[5m])))'
        " / on (site) group_left cdrsync:site_pending_changes offset 15m > 1e3"
        ' or vector(0) unless count(ALERTS{alertstate="firing", x=~"a|b"}) and time() - up'
    )
    assert metric_names(expr) == {
        "cdrsync_end_to_end_latency_seconds_bucket",
        "cdrsync:site_pending_changes",
        "ALERTS",
        "up",
    }


def test_every_query_names_a_metric_the_code_exports(config: Config) -> None:
    known = exported_names(config) | {str(rule["record"]) for rule in rules() if "record" in rule}
    unknown = [
        (where, name)
        for where, expr in dashboard_expressions() + rule_expressions()
        for name in sorted(metric_names(expr))
        if name not in known
    ]
    assert unknown == []


def test_every_metric_cdrsync_exports_is_on_a_dashboard_or_in_a_rule(config: Config) -> None:
    used = {name for _, expr in dashboard_expressions() + rule_expressions() for name in metric_names(expr)}
    unused = [family for family, samples in family_names(config).items() if not samples & used]
    assert unused == []


def test_the_five_dashboards_use_the_provisioned_datasource() -> None:
    boards = dashboards()
    assert {board["title"] for board in boards.values()} == {
        "cdrsync / Sync Overview",
        "cdrsync / Pipeline Health",
        "cdrsync / Error Analysis",
        "cdrsync / Resource Breakdown",
        "cdrsync / Per Hospital",
    }
    assert len({board["uid"] for board in boards.values()}) == 5
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    for board in boards.values():
        for panel in _panels(board["panels"]):
            if panel["type"] != "row":
                assert panel["datasource"]["uid"] == uid, panel["title"]
                assert panel["targets"], panel["title"]


def test_the_dashboards_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_dashboards", GRAFANA / "generate_dashboards.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    on_disk = {name: (GRAFANA / "dashboards" / name).read_text() for name in dashboards()}
    assert module.render() == on_disk, "run .venv/bin/python compose/grafana/generate_dashboards.py"


def test_sync_overview_colours_each_route_green_yellow_red() -> None:
    board = dashboards()["sync-overview.json"]
    first = board["panels"][0]
    assert "cdrsync:route_last_success_timestamp_seconds" in first["targets"][0]["expr"]
    steps = first["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [(s["color"], s["value"]) for s in steps] == [("green", None), ("yellow", 300), ("red", 900)]


def test_provisioning_points_grafana_at_the_dashboards() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cdrsync.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    assert Path(GRAFANA / "dashboards").is_dir()
