"""The Grafana dashboard is well-formed: one data source variable used everywhere, a layout without
overlaps, and the panels and annotations the runbook refers to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "charts/feedloop/dashboards/feedloop.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_datasource_is_a_template_variable_used_by_every_query() -> None:
    dashboard = load()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = load()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_promotions_are_annotated_and_the_main_views_exist() -> None:
    dashboard = load()
    annotations = {a["name"]: a for a in dashboard["annotations"]["list"]}
    assert "feedloop_active_adapter_promoted_timestamp_seconds" in annotations["Adapter promotions"]["expr"]
    assert annotations["Adapter promotions"]["datasource"] == DATASOURCE
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == [
        "Serving",
        "Feedback and adapter versions",
        "Pairs pipeline",
        "Training and gate",
        "Canary",
        "Redis (redis_exporter)",
    ]
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for needle in (
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "feedloop_time_to_first_token_seconds_bucket",
        "feedloop_feedback_likes_total",
        "feedloop_pairs_built_total",
        "feedloop_feedback_backlog_lag",
        "feedloop_training_runs_total",
        "feedloop_gate_results_total",
        "feedloop_canary_like_rate",
        "feedloop_canary_decisions_total",
        "redis_memory_max_bytes",
    ):
        assert needle in exprs, needle
