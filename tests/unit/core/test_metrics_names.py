"""Every metric name the dashboard and the alert rules use is one services/core/metrics.py defines."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.core import metrics

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "charts/feedloop/dashboards/feedloop.json"
RULES = ROOT / "charts/feedloop/files/alerts.yaml"

# vLLM's own engine metrics, registered by its PrometheusStatLogger in the API process (checked against
# the installed vLLM source below, and live in tests/integration/test_engine_metrics.py).
VLLM_METRICS = {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"}
# Metrics of oliver006/redis_exporter, deployed next to Redis; feedloop does not define them.
REDIS_EXPORTER_METRICS = {
    "redis_up",
    "redis_memory_used_bytes",
    "redis_memory_max_bytes",
    "redis_connected_clients",
    "redis_evicted_keys_total",
}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
FORBIDDEN_LABELS = {"user", "user_id", "completion_id", "feedback_id", "request_id", "ip", "ip_hash", "token"}

FEEDLOOP_NAME = re.compile(r"(?<![\w:])feedloop_[a-z0-9_]+")
RECORDED_NAME = re.compile(r"(?<![\w:])feedloop:[a-z0-9_:]+")
OTHER_NAME = re.compile(r"(?<![\w:])(?:vllm:[a-z0-9_]+|redis_[a-z0-9_]+)")
SELECTOR = re.compile(r"(?<![\w:])(feedloop_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
BY_CLAUSE = re.compile(r"\bby\s*\(([^)]*)\)")


def defined_metrics() -> list[MetricWrapperBase]:
    return [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]


def sample_names() -> dict[str, set[str]]:
    """Every sample name services/core/metrics.py can export, with the label names it carries."""
    names: dict[str, set[str]] = {}
    for metric in defined_metrics():
        family = next(iter(metric.describe()))
        labels = set(metric._labelnames)
        suffixes = {
            "counter": ["_total", "_created"],
            "gauge": [""],
            "histogram": ["_bucket", "_count", "_sum", "_created"],
            "info": ["_info"],
        }[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for name in metrics.ENGINE_METRIC_HELP:
        names[name] = set()
    return names


def dashboard_exprs() -> Iterator[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    yield from walk(json.loads(DASHBOARD.read_text()))


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def all_exprs() -> list[str]:
    return [*dashboard_exprs(), *(rule["expr"] for rule in rules())]


def test_expressions_were_found() -> None:
    assert len(list(dashboard_exprs())) > 40
    assert len(rules()) > 30


@pytest.mark.parametrize("expr", all_exprs())
def test_expression_uses_only_defined_metrics_and_labels(expr: str) -> None:
    known = sample_names()
    for name in FEEDLOOP_NAME.findall(expr):
        assert name in known, f"{name} is not exported by services/core/metrics.py"
    for name in OTHER_NAME.findall(expr):
        assert name in VLLM_METRICS | REDIS_EXPORTER_METRICS, f"{name} is neither feedloop's nor allow-listed"
    for name, matchers in SELECTOR.findall(expr):
        for label in MATCHER_LABEL.findall(matchers):
            assert label in known[name] | TARGET_LABELS, f"{name} has no label {label!r}"
    # Grouping labels must exist on the feedloop metrics the expression reads (when it reads only those).
    referenced = FEEDLOOP_NAME.findall(expr)
    if referenced and not OTHER_NAME.search(expr) and not RECORDED_NAME.search(expr):
        available = set().union(*(known[n] for n in referenced)) | TARGET_LABELS
        for clause in BY_CLAUSE.findall(expr):
            for label in filter(None, (part.strip() for part in clause.split(","))):
                assert label in available, f"grouping by {label!r}, which none of {referenced} has"


def test_recorded_series_used_by_rules_are_recorded() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in RECORDED_NAME.findall(rule["expr"]):
            assert name in recorded, f"{name} is used but never recorded"


def test_allow_listed_vllm_metrics_exist_in_the_installed_vllm() -> None:
    spec = find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    source = (Path(spec.origin).parent / "v1/metrics/loggers.py").read_text()
    for name in VLLM_METRICS:
        assert f'name="{name}"' in source


def test_metric_names_follow_prometheus_conventions() -> None:
    for metric in defined_metrics():
        family = next(iter(metric.describe()))
        assert family.name.startswith("feedloop_"), family.name
        assert metric._documentation, f"{family.name} has no help text"
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_bytes")), f"{family.name}: histogram without base unit"
        assert not set(metric._labelnames) & FORBIDDEN_LABELS, f"{family.name} has an unbounded label"
    # A counter's exported name ends in _total (prometheus_client strips it from the family name).
    assert "feedloop_http_requests_total" in sample_names()
    assert "feedloop_feedback_votes_total" in sample_names()
