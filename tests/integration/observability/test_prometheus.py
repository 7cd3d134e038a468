"""A real Prometheus scrapes the running API and a real Celery worker; the series it stores must match
what the test did, the rules file must load, and no label may grow with the number of users.

Needs the ``prometheus`` binary (Debian package ``prometheus``; scripts/install.sh installs it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ARTIFACTS, REPO, LiveApi, free_port
from tests.support.shared_server import forget_ephemeral_keys, serve_base_model
from workers.training.runs import TERMINAL, RunStore

RULES = REPO / "charts/feedloop/files/alerts.yaml"
# A family may hold this many series at most, however many users there are (the biggest is the HTTP
# duration histogram: routes x methods x 15 buckets).
MAX_SERIES_PER_FAMILY = 600


@dataclass
class Prometheus:
    url: str

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float:
        """Sum of an instant vector's values (0 when it is empty)."""
        return sum(float(sample["value"][1]) for sample in self.query(promql))

    def wait_for(self, promql: str, accept: Callable[[float], bool], timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            current = self.value(promql)
            if accept(current):
                return current
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql} = {current} after {timeout}s")
            time.sleep(0.5)

    def settle(self) -> None:
        """Wait for scrapes that include everything done so far."""
        time.sleep(2.5)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    metrics_url: str
    log_path: Path


def wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float, hint: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout}s ({hint}):\n{log_path.read_text(errors='replace')[-4000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def worker(live_api: LiveApi) -> Iterator[Worker]:
    port = free_port()
    log_path = ARTIFACTS / "logs" / "prometheus-test-worker.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **live_api.env, "FEEDLOOP_METRICS_PORT": str(port)}
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        "2",
        "-Q",
        "pairs,train",
        "--loglevel",
        "INFO",
        "-n",
        f"metrics-{uuid.uuid4().hex[:6]}@%h",
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        wait_http(url, proc, log_path, 120, "is metrics.instrument_celery(app) called in workers/celery_app.py?")
        yield Worker(proc, url, log_path)
    finally:
        stop(proc)
        forget_ephemeral_keys(live_api, workers_stopped=True)  # a lease its run may have left


@pytest.fixture(scope="module")
def prometheus(live_api: LiveApi, worker: Worker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found: apt-get install -y prometheus (scripts/install.sh does it)")
    workdir = tmp_path_factory.mktemp("prometheus")
    api_target = live_api.base_url.removeprefix("http://")
    worker_target = worker.metrics_url.removeprefix("http://").removesuffix("/metrics")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "feedloop-api", "static_configs": [{"targets": [api_target]}]},
            {"job_name": "feedloop-worker", "static_configs": [{"targets": [worker_target]}]},
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = ARTIFACTS / "logs" / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", proc, log_path, 60, "prometheus start")
        prom = Prometheus(f"http://127.0.0.1:{port}")
        prom.wait_for('sum(up{job=~"feedloop-.*"})', lambda v: v == 2, timeout=30)
        yield prom
    finally:
        stop(proc)


@pytest.fixture(autouse=True)
def _leave_the_shared_server_clean(live_api: LiveApi) -> Iterator[None]:
    """These tests vote on the shared server: drop the short-lived keys they leave (rate-limit buckets), so
    none expires in the middle of a later test that compares Redis state before and after a request."""
    yield
    forget_ephemeral_keys(live_api)


def chat(client: httpx.Client, base_url: str, content: str, user: str, stream: bool = False) -> dict[str, Any]:
    body = {
        "model": "feedloop",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "user": user,
        "stream": stream,
    }
    if not stream:
        response = client.post(f"{base_url}/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()
    last: dict[str, Any] = {}
    with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                if "feedback" in chunk:
                    last = chunk
    return last


def vote(client: httpx.Client, base_url: str, completion: dict[str, Any], rating: str, user: str) -> int:
    feedback = completion["feedback"]
    body = {
        "completion_id": feedback["completion_id"],
        "token": feedback["token"],
        "rating": rating,
        "user": user,
    }
    return client.post(f"{base_url}/v1/feedback", json=body).status_code


def test_prometheus_loads_the_rules_and_scrapes_both_targets(prometheus: Prometheus) -> None:
    rules = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {group["name"] for group in rules} >= {"feedloop-slo", "feedloop-adapters", "feedloop-pipeline"}
    assert all(rule["health"] != "err" for group in rules for rule in group["rules"])
    targets = prometheus.query('up{job=~"feedloop-.*"}')
    assert {t["metric"]["job"]: t["value"][1] for t in targets} == {
        "feedloop-api": "1",
        "feedloop-worker": "1",
    }
    # vLLM's own engine metrics come through the API's /metrics
    assert prometheus.value('count(vllm:kv_cache_usage_perc{job="feedloop-api"})') >= 1
    assert prometheus.value('count(vllm:num_requests_waiting{job="feedloop-api"})') >= 1


def test_chat_and_feedback_series_count_what_was_done(live_api: LiveApi, prometheus: Prometheus) -> None:
    queries = {
        "chats": 'sum(feedloop_http_requests_total{route="/v1/chat/completions",status="200"})',
        "events": "sum(feedloop_feedback_events_total)",
        "votes": "sum(feedloop_feedback_votes_total)",
        "likes": "sum(feedloop_feedback_likes_total)",
        "ttft": "sum(feedloop_time_to_first_token_seconds_count)",
        "output_tokens": "sum(feedloop_output_tokens_total)",
        "refused_bad_token": 'sum(feedloop_feedback_refused_total{reason="bad_token"})',
    }
    prometheus.settle()
    before = {name: prometheus.value(q) for name, q in queries.items()}

    users = [f"prom-user-{i}" for i in range(8)]
    ratings = ["like", "like", "like", "dislike", "dislike", "like", "dislike", "like"]
    with httpx.Client(timeout=60) as client:
        # six plain chats and two streamed ones; a vote may only come from the user who chatted
        completions = [
            chat(client, live_api.base_url, f"metrics question {i}", user, stream=i >= 6)
            for i, user in enumerate(users)
        ]
        for completion, rating, user in zip(completions, ratings, users, strict=True):
            assert vote(client, live_api.base_url, completion, rating, user) == 202
        forged = {**completions[0], "feedback": {**completions[0]["feedback"], "token": "forged"}}
        assert vote(client, live_api.base_url, forged, "like", users[0]) == 403

    expected = {
        "chats": 8,
        "events": 8,
        "votes": 8,
        "likes": ratings.count("like"),
        "refused_bad_token": 1,
    }
    for name, delta in expected.items():
        prometheus.wait_for(queries[name], lambda v, n=name, d=delta: v - before[n] == d)  # type: ignore[misc]
    assert prometheus.value(queries["ttft"]) - before["ttft"] >= 2  # the streamed chats at least
    assert prometheus.value(queries["output_tokens"]) - before["output_tokens"] >= 8
    # like-rate per adapter version, as the dashboard computes it, is a ratio in [0, 1]
    rates = prometheus.query(
        "sum by (adapter) (feedloop_feedback_likes_total) / sum by (adapter) (feedloop_feedback_votes_total > 0)"
    )
    assert rates and all(0 <= float(r["value"][1]) <= 1 for r in rates)


def make_pairs(live_api: LiveApi, prometheus: Prometheus, prompts: int = 60) -> None:
    """The same prompt answered twice, one answer liked and one disliked: a same_prompt pair each, built by the
    worker's consume task. Sixty pairs leave held-out pairs for the gate (eval_fraction 0.1, raised towards
    pairs.min_eval_pairs on a set this small)."""
    from workers.celery_app import create_app

    with httpx.Client(timeout=60) as client:
        for i in range(prompts):
            prompt = f"pairing prompt {i} {uuid.uuid4().hex[:6]}"
            liked = chat(client, live_api.base_url, prompt, f"pair-user-{i}")
            disliked = chat(client, live_api.base_url, prompt, f"pair-user-{i}")
            assert vote(client, live_api.base_url, liked, "like", f"pair-user-{i}") == 202
            assert vote(client, live_api.base_url, disliked, "dislike", f"pair-user-{i}") == 202
    prometheus.settle()
    consumed_before = prometheus.value('sum(feedloop_task_runs_total{task="pairs.consume",outcome="success"})')
    create_app(live_api.settings).send_task("pairs.consume", kwargs={"max_seconds": 30, "until_drained": True})
    prometheus.wait_for(
        'sum(feedloop_task_runs_total{task="pairs.consume",outcome="success"})',
        lambda v: v > consumed_before,
        timeout=90,
    )


def test_pairing_series(live_api: LiveApi, prometheus: Prometheus) -> None:
    prometheus.settle()
    built_before = prometheus.value("sum(feedloop_pairs_built_total)")
    make_pairs(live_api, prometheus)
    prometheus.wait_for("sum(feedloop_pairs_built_total)", lambda v: v > built_before)
    # the worker reports a real backlog (the API exports the gauge as NaN)
    prometheus.wait_for('count(feedloop_feedback_backlog_lag{job="feedloop-worker"} >= 0)', lambda v: v == 1)
    assert prometheus.value('sum(feedloop_task_duration_seconds_count{task="pairs.consume"})') >= 1


def test_training_series(live_api: LiveApi, prometheus: Prometheus, request: pytest.FixtureRequest) -> None:
    """Starts a run as `feedloop train --now` does: claim it with the trigger (forced), and the worker's train
    queue executes it. It makes its own pairs unless enough new ones are there (whatever ran before it), and
    puts the shared server back on the base model afterwards (the run auto-promotes)."""
    from workers.celery_app import create_app
    from workers.training.trigger import Trigger

    trigger = Trigger(live_api.redis, live_api.keys, live_api.settings)
    if trigger.new_pairs() < 50:
        make_pairs(live_api, prometheus)
    request.addfinalizer(lambda: (serve_base_model(live_api), forget_ephemeral_keys(live_api)))
    app = create_app(live_api.settings)
    prometheus.settle()
    succeeded_before = prometheus.value('sum(feedloop_training_runs_total{outcome="success"})')
    gate_before = prometheus.value("sum(feedloop_gate_results_total)")
    # The module's worker may have started a run of its own on earlier tests' pairs: as `train --now` does, a
    # forced run waits for the run slot, and the checks below are about our run, not every run.
    deadline = time.monotonic() + 300
    while True:
        result = trigger.check(
            enqueue=lambda run_id: app.send_task("train.run", args=[run_id], task_id=run_id), force=True
        )
        if result.action == "started" or result.reason != "run_in_progress" or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.action == "started", result.to_dict()
    runs = RunStore(live_api.redis, live_api.keys)
    deadline = time.monotonic() + 300
    while (runs.get(result.run_id) or {}).get("status") not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    run = runs.get(result.run_id) or {}
    assert run.get("status") in TERMINAL - {"failed"}, run  # trained (the gate's verdict is not the point here)
    prometheus.wait_for('sum(feedloop_training_runs_total{outcome="success"})', lambda v: v > succeeded_before)
    assert prometheus.value("sum(feedloop_training_duration_seconds_count)") >= 1
    assert math.isfinite(prometheus.value("max(feedloop_training_last_loss)"))
    assert 0 <= prometheus.value("max(feedloop_training_last_reward_accuracy)") <= 1
    assert prometheus.value("max(feedloop_dataset_pairs)") >= 1
    prometheus.wait_for("sum(feedloop_gate_results_total)", lambda v: v > gate_before)


def series_per_family(prometheus: Prometheus, prefix: str) -> dict[str, int]:
    result = prometheus.query(f'count by (__name__) ({{__name__=~"{prefix}.+"}})')
    return {r["metric"]["__name__"]: int(float(r["value"][1])) for r in result}


def label_values(prometheus: Prometheus) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    for sample in prometheus.query('{__name__=~"feedloop_.+|vllm:.+"}'):
        for label, value in sample["metric"].items():
            values.setdefault(label, set()).add(value)
    return values


def drive_users(live_api: LiveApi, users: list[str]) -> int:
    """Ten requests per user, of every kind the public API gets; returns the number of requests sent."""
    base = live_api.base_url

    def one_user(user: str) -> int:
        with httpx.Client(timeout=120) as client:
            completion: dict[str, Any] = {}
            for i in range(10):
                step = i % 5
                if step == 0:
                    completion = chat(client, base, f"hello from {user}", user)
                elif step == 1:
                    assert vote(client, base, completion, "like" if i < 5 else "dislike", user) == 202
                elif step == 2:
                    completion_id = completion["feedback"]["completion_id"]
                    params = {"user": user, "token": completion["feedback"]["token"]}
                    assert client.get(f"{base}/v1/feedback/{completion_id}", params=params).status_code == 200
                elif step == 3 and i < 5:  # a forged token holding the user id
                    forged = {"feedback": {**completion["feedback"], "token": user}}
                    assert vote(client, base, forged, "like", user) == 403
                elif step == 3:  # a path no route matches, holding the user id
                    assert client.get(f"{base}/nowhere/{user}/{uuid.uuid4().hex}").status_code == 404
                else:
                    body = {"model": f"no-such-model-{user}", "messages": [{"role": "user", "content": "x"}]}
                    assert client.post(f"{base}/v1/chat/completions", json=body).status_code == 404
        return 10

    with ThreadPoolExecutor(max_workers=16) as pool:
        return sum(pool.map(one_user, users))


@pytest.mark.slow
def test_series_do_not_grow_with_users(live_api: LiveApi, prometheus: Prometheus) -> None:
    sent = drive_users(live_api, [f"card-user-{i:04d}" for i in range(100)])
    prometheus.settle()
    after_100_users = series_per_family(prometheus, "feedloop_")

    sent += drive_users(live_api, [f"card-user-{i:04d}" for i in range(100, 1000)])
    assert sent == 10_000
    prometheus.settle()
    after_1000_users = series_per_family(prometheus, "feedloop_")

    # Ten times the users: a label keyed by user or completion would multiply series by ten. A new label
    # value that load alone brings (say an interaction write "dropped") may add a few.
    assert sum(after_1000_users.values()) <= 1.1 * sum(after_100_users.values()) + 50, (
        after_100_users,
        after_1000_users,
    )
    assert max(after_1000_users.values()) <= MAX_SERIES_PER_FAMILY, after_1000_users
    assert max(series_per_family(prometheus, "vllm:").values()) <= MAX_SERIES_PER_FAMILY
    values = label_values(prometheus)
    for label, seen in values.items():
        if label not in ("__name__", "le"):  # le: histogram bucket bounds, fixed per histogram
            assert len(seen) <= 40, f"label {label!r} has {len(seen)} values"
        for value in seen:  # no user id, completion id or raw path anywhere
            assert "card-user" not in value and "chatcmpl" not in value and "/nowhere/" not in value, (
                label,
                value,
            )
    assert "unmatched" in values["route"]
    assert prometheus.value('sum(feedloop_http_requests_total{route="unmatched"})') >= 1_000
