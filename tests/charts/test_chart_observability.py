"""PrometheusRule and Grafana dashboards come from files in the chart (files/alerts.yaml, dashboards/*.json):
rendered when the files are there and the toggles are on, nothing at all otherwise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from chartlib import CHART_DIR, VALUES_DIR, by_kind

EVERYTHING = VALUES_DIR / "everything.yaml"

ALERTS = """\
groups:
  - name: feedloop
    rules:
      - alert: FeedloopApiDown
        expr: up{job="rel-feedloop-api"} == 0
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: "API replica {{ $labels.pod }} is down"
      - record: feedloop:feedback:rate5m
        expr: sum(rate(feedloop_feedback_total[5m]))
"""


def add_observability_files(chart: Path) -> None:
    """Replace whatever the chart ships with a known alerts file and two dashboards."""
    shutil.rmtree(chart / "dashboards", ignore_errors=True)
    (chart / "files").mkdir(exist_ok=True)
    (chart / "files" / "alerts.yaml").write_text(ALERTS)
    (chart / "dashboards").mkdir(exist_ok=True)
    for name in ("feedloop_overview", "feedloop.training"):
        (chart / "dashboards" / f"{name}.json").write_text(json.dumps({"title": name, "panels": []}))


def test_rules_and_dashboards_render_from_the_chart_files(render, chart_copy):
    add_observability_files(chart_copy)
    objects = render(EVERYTHING, chart=chart_copy)
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    alert, record = group["rules"]
    assert alert["alert"] == "FeedloopApiDown" and alert["for"] == "5m"
    # Prometheus templating in annotations passes through untouched by Helm
    assert alert["annotations"]["summary"] == "API replica {{ $labels.pod }} is down"
    assert record["record"] == "feedloop:feedback:rate5m"

    dashboards = [o for o in by_kind(objects, "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]
    assert sorted(d["metadata"]["name"] for d in dashboards) == [
        "rel-feedloop-dashboard-feedloop-overview",
        "rel-feedloop-dashboard-feedloop-training",
    ]
    for dashboard in dashboards:
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert dashboard["metadata"]["annotations"] == {"grafana_folder": "feedloop"}
        ((filename, content),) = dashboard["data"].items()
        assert json.loads(content)["title"] == filename.removesuffix(".json")


def test_toggles_off_render_no_rules_or_dashboards(render, chart_copy):
    add_observability_files(chart_copy)
    objects = render(chart=chart_copy)
    assert not by_kind(objects, "PrometheusRule")
    assert not by_kind(objects, "ServiceMonitor")
    assert not [o for o in by_kind(objects, "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]


def test_missing_files_render_nothing_even_when_enabled(render, chart_copy):
    (chart_copy / "files" / "alerts.yaml").unlink(missing_ok=True)
    shutil.rmtree(chart_copy / "dashboards", ignore_errors=True)
    objects = render(EVERYTHING, chart=chart_copy)
    assert not by_kind(objects, "PrometheusRule")
    assert not [o for o in by_kind(objects, "ConfigMap") if "-dashboard-" in o["metadata"]["name"]]


def test_the_repository_chart_renders_whatever_observability_files_it_ships(render):
    objects = render(EVERYTHING)
    ships_alerts = (CHART_DIR / "files" / "alerts.yaml").exists()
    assert bool(by_kind(objects, "PrometheusRule")) == ships_alerts
    dashboards = sorted(p.name for p in (CHART_DIR / "dashboards").glob("*.json"))
    rendered = sorted(
        key
        for o in by_kind(objects, "ConfigMap")
        if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
        for key in o["data"]
    )
    assert rendered == dashboards


def test_an_alerts_file_without_groups_is_refused(render, chart_copy):
    (chart_copy / "files").mkdir(exist_ok=True)
    (chart_copy / "files" / "alerts.yaml").write_text("rules: []\n")
    with pytest.raises(Exception, match="top-level `groups:`"):
        render(EVERYTHING, chart=chart_copy)
