"""The metric helpers of services/core/metrics.py, read back through the default registry."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from celery import Celery
from prometheus_client import REGISTRY

from services.core import metrics


def value(name: str, **labels: str) -> float:
    sample = REGISTRY.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def test_record_feedback_counts_votes_and_likes_per_adapter() -> None:
    before = {k: value(f"feedloop_feedback_{k}_total", adapter="unit-v1") for k in ("likes", "votes")}
    metrics.record_feedback("like", "unit-v1")
    metrics.record_feedback("dislike", "unit-v1")
    metrics.record_feedback("withdrawn", "unit-v1")
    assert value("feedloop_feedback_likes_total", adapter="unit-v1") == before["likes"] + 1
    assert value("feedloop_feedback_votes_total", adapter="unit-v1") == before["votes"] + 2
    assert value("feedloop_feedback_events_total", rating="withdrawn", adapter="unit-v1") >= 1


def test_only_dislikes_still_give_a_likes_series_at_zero() -> None:
    metrics.record_feedback("dislike", "unit-v2")
    assert REGISTRY.get_sample_value("feedloop_feedback_likes_total", {"adapter": "unit-v2"}) == 0


def test_base_model_is_labelled_base() -> None:
    before = value("feedloop_feedback_votes_total", adapter="base")
    metrics.record_feedback("like", None)
    assert value("feedloop_feedback_votes_total", adapter="base") == before + 1


def test_set_active_adapter_keeps_one_info_series_and_precreates_counters() -> None:
    metrics.set_active_adapter("unit-v3", 1_700_000_000.0)
    metrics.set_active_adapter("unit-v4", 1_700_000_100.0)
    assert REGISTRY.get_sample_value("feedloop_active_adapter_info", {"version": "unit-v3"}) is None
    assert REGISTRY.get_sample_value("feedloop_active_adapter_info", {"version": "unit-v4"}) == 1
    assert REGISTRY.get_sample_value("feedloop_active_adapter_promoted_timestamp_seconds") == 1_700_000_100.0
    assert REGISTRY.get_sample_value("feedloop_feedback_votes_total", {"adapter": "unit-v4"}) == 0
    metrics.set_active_adapter(None, None)
    assert REGISTRY.get_sample_value("feedloop_active_adapter_info", {"version": "base"}) == 1
    assert math.isnan(REGISTRY.get_sample_value("feedloop_active_adapter_promoted_timestamp_seconds") or 0)


def test_unknown_label_values_are_coerced_to_other() -> None:
    before = value("feedloop_feedback_refused_total", reason="other")
    metrics.refuse_feedback("something-a-user-typed")
    assert value("feedloop_feedback_refused_total", reason="other") == before + 1
    metrics.observe_request(None, "BREW", 418, 0.01)
    assert value("feedloop_http_requests_total", route="unmatched", method="other", status="418") >= 1


def test_fixed_series_start_at_zero_and_last_value_gauges_at_nan() -> None:
    # A fresh process: earlier tests in this one may already have set the gauges.
    fresh = subprocess.run(
        [
            sys.executable,
            "-c",
            "import math; from prometheus_client import REGISTRY; import services.core.metrics; "
            "v = REGISTRY.get_sample_value; "
            "print(v('feedloop_training_runs_total', {'outcome': 'failure'}), "
            "v('feedloop_adapter_swaps_total', {'outcome': 'failure'}), "
            "math.isnan(v('feedloop_feedback_backlog_lag')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout.split() == ["0.0", "0.0", "True"]
    metrics.set_feedback_backlog(lag=7, pending=3)
    assert REGISTRY.get_sample_value("feedloop_feedback_backlog_lag") == 7
    assert REGISTRY.get_sample_value("feedloop_feedback_backlog_pending") == 3


def test_record_training_run_sets_only_given_gauges() -> None:
    metrics.record_training_run("success", seconds=12.0, loss=0.5, reward_accuracy=0.75)
    assert REGISTRY.get_sample_value("feedloop_training_last_loss") == 0.5
    assert REGISTRY.get_sample_value("feedloop_training_last_reward_accuracy") == 0.75
    assert (REGISTRY.get_sample_value("feedloop_training_duration_seconds_count") or 0) >= 1
    metrics.record_training_run("failure")
    assert REGISTRY.get_sample_value("feedloop_training_last_loss") == 0.5


def test_engine_collector_survives_a_failing_engine() -> None:
    def broken() -> metrics.EngineStats:
        raise RuntimeError("engine stopped")

    metrics.engine_collector(broken)
    try:
        assert b"feedloop_engine_lora_slots_used" not in metrics.latest_metrics()[0]
        metrics.engine_collector(lambda: metrics.EngineStats(lora_slots_used=2, lora_slots_max=8))
        assert REGISTRY.get_sample_value("feedloop_engine_lora_slots_used") == 2
        assert REGISTRY.get_sample_value("feedloop_engine_requests_running") is None
    finally:
        metrics.unregister_engine_collector()


def test_celery_task_runs_are_counted_by_outcome() -> None:
    app = Celery("metrics-test", broker="memory://", backend="cache+memory://")

    @app.task(name="unit.ok")
    def ok() -> int:
        return 1

    @app.task(name="unit.boom")
    def boom() -> None:
        raise ValueError("boom")

    metrics.instrument_celery(app)
    metrics.instrument_celery(app)  # idempotent: still one count per run
    ok.apply()
    ok.apply()
    boom.apply()
    assert value("feedloop_task_runs_total", task="unit.ok", outcome="success") == 2
    assert value("feedloop_task_runs_total", task="unit.boom", outcome="failure") == 1
    assert value("feedloop_task_duration_seconds_count", task="unit.ok") == 2


def test_worker_metrics_server_serves_the_registry_and_tolerates_a_taken_port() -> None:
    port = metrics.start_worker_metrics_server(0, addr="127.0.0.1")
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "# TYPE feedloop_http_requests_total counter" in body
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert metrics.start_worker_metrics_server(taken.getsockname()[1], addr="127.0.0.1") is None


def test_a_started_worker_serves_its_task_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.contrib.testing.worker import start_worker

    from services.core.config import get_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("FEEDLOOP_METRICS_PORT", str(port))
    get_settings.cache_clear()
    app = Celery("metrics-worker-test", broker="memory://", backend="cache+memory://")

    @app.task(name="unit.worker_ok")
    def worker_ok() -> int:
        return 1

    expected = 'feedloop_task_runs_total{outcome="success",task="unit.worker_ok"} 1.0'
    metrics.instrument_celery(app)
    try:
        with start_worker(app, pool="threads", concurrency=1, perform_ping_check=False, loglevel="WARNING"):
            assert worker_ok.delay().get(timeout=10) == 1
            # the result is stored just before task_postrun fires: poll briefly
            deadline = time.monotonic() + 10
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                    body = response.read().decode()
                if expected in body or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
    finally:
        get_settings.cache_clear()
    assert expected in body
