"""The Prometheus rules file is valid, its alerts behave on synthetic series, and each has a runbook.

promtool comes from Debian's ``prometheus`` package (scripts/install.sh installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts/feedloop/files/alerts.yaml"
RULE_TESTS = ROOT / "tests/promtool/alerts_test.yaml"
RUNBOOK = ROOT / "docs/observability.md"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install -y prometheus (scripts/install.sh does it)")
    return path


def alerts() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    # promtool resolves rule_files relative to the test file, so run it from there.
    result = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_tests_cover_the_required_alerts() -> None:
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a firing case, not only a silent one
    }
    assert {"FeedloopAdapterLikeRateRegression", "FeedloopFeedbackBacklogGrowing"} <= tested


def test_every_alert_has_severity_summary_and_a_runbook_section() -> None:
    headings = re.findall(r"^#{2,4} (.+)$", RUNBOOK.read_text(), flags=re.MULTILINE)
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alerts():
        assert rule["labels"]["severity"] in {"page", "critical", "warning", "ticket", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "docs/observability.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {RUNBOOK.name}"
