"""The Prometheus alert rules: valid, unit-tested with promtool, and each one shown firing and not firing.

promtool comes with the Debian package `prometheus` (make system-deps); without it these tests fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.unit
PROMETHEUS = ROOT / "compose" / "prometheus"
RULES = PROMETHEUS / "rules" / "cdrsync.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "cdrsync.rules.test.yml"
# The case study's ten alerts (seeds/000, "Production-Grade Observability"), in its order.
CASE_STUDY_ALERTS = [
    "SyncStale",
    "HighErrorRate",
    "ConsumerLagGrowing",
    "ReplicationSlotWalHigh",
    "DeadLetters",
    "WorkerRestartLoop",
    "TargetAuthFailure",
    "TargetUnreachable",
    "DiskPressure",
    "MissingSharedIdentifier",
]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; fail (never skip) when it is not installed."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool not found: install the Debian package 'prometheus' (make system-deps)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, check=False)


def alert_rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_case_study_alerts_are_all_there_with_a_severity_and_a_runbook() -> None:
    rules = alert_rules()
    assert set(CASE_STUDY_ALERTS) <= {rule["alert"] for rule in rules}
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]  # type: ignore[index]
        assert {"summary", "runbook"} <= set(rule["annotations"]), rule["alert"]  # type: ignore[arg-type]


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases: dict[str, set[str]] = defaultdict(set)
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", []):
            cases[case["alertname"]].add("firing" if case["exp_alerts"] else "silent")
    missing = {rule["alert"]: cases.get(str(rule["alert"]), set()) for rule in alert_rules()}
    assert {name: kinds for name, kinds in missing.items() if kinds != {"firing", "silent"}} == {}


def test_the_stack_configuration_is_valid(tmp_path: Path) -> None:
    # What compose/native/prometheus.sh renders: every ${NAME} replaced from the environment.
    values = {
        "REPO_ROOT": str(ROOT),
        "CDRSYNC_WEB_PORT": "6066",
        "CDRSYNC_MONITOR_PORT": "6067",
        "PROMETHEUS_PORT": "9090",
        "PROMETHEUS_HOME": str(tmp_path),
    }
    text = (PROMETHEUS / "prometheus.yml").read_text()
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(text)
    result = promtool("check", "config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(text)["scrape_configs"]}
    assert {"cdrsync-worker", "cdrsync-monitor"} <= jobs
    assert os.path.isabs(yaml.safe_load(text)["rule_files"][0])
