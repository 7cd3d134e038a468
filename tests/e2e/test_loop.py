"""The whole loop through public interfaces: chat -> feedback -> pairs -> DPO -> gate -> promotion -> swap.

Real parts only: the shared API server (vLLM on CPU, tiny model), a Celery worker on ``pairs``, one on
``train`` and a beat process, all on the server's Redis key prefix. Users chat, dislike the answers and
send corrections through the API; beat's consume task turns them into correction pairs, beat's training
check starts a run once enough new pairs are there, the run trains a DPO adapter (tiny settings, with an
SFT term so greedy generation stays clean for the gate's smoke check), the gate passes it, it is
auto-promoted, and the server hot-swaps it: the public alias then answers differently, from the new version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveApi
from tests.support import celery_procs
from tests.support.preference_data import FACTS, PROMPT_FORMS, SMOKE_PROMPTS
from tests.support.shared_server import forget_ephemeral_keys, serve_base_model
from workers.training.runs import RunStore
from workers.training.trigger import Trigger

pytestmark = pytest.mark.slow

USERS = 48  # each dislikes one answer with a correction: one correction pair each
MIN_KEPT = 40  # of those, what the dataset keeps after the quality filters


def chat(live_api: LiveApi, prompt: str, user: str | None = None, **sampling) -> dict:
    body = {
        "model": "feedloop",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 16,
        **sampling,
    }
    if user:
        body["user"] = user
    response = httpx.post(live_api.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def registry(live_api: LiveApi) -> dict:
    response = httpx.get(live_api.base_url + "/admin/adapters", headers=live_api.admin_headers(), timeout=30)
    assert response.status_code == 200
    return response.json()


def test_feedback_becomes_a_promoted_adapter_that_serves(
    live_api: LiveApi, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Start from the base model whatever earlier tests on the shared server promoted or pinned: the users'
    # answers (the rejected sides) and the gate's comparison are then the same as in a run of this test alone.
    serve_base_model(live_api)
    known = {a["version"] for a in registry(live_api)["adapters"]}
    probe = {"temperature": 1.0, "seed": 1234}
    before = chat(live_api, SMOKE_PROMPTS[0], **probe)
    # What the trigger counts: pairs stored since the last run's dataset snapshot (not all stored pairs), so
    # the run starts once every user's pair is in, whatever earlier tests on the shared server stored.
    stored = Trigger(live_api.redis, live_api.keys, live_api.settings).new_pairs()
    env = {
        **live_api.env,
        "FEEDLOOP_METRICS_PORT": "0",
        "FEEDLOOP_PAIRS__STRATEGIES": '["correction"]',
        "FEEDLOOP_PAIRS__EVAL_FRACTION": "0.3",
        # The run waits for every user's pair, so its dataset does not depend on how fast this machine is.
        "FEEDLOOP_TRAINING__MIN_PAIRS": str(stored + USERS),
        "FEEDLOOP_TRAINING__MIN_PAIRS_FLOOR": str(stored + USERS),
        "FEEDLOOP_TRAINING__CHECK_INTERVAL_S": "2",
        "FEEDLOOP_TRAINING__CONTINUE_FROM_ACTIVE": "false",
        # Tiny settings that teach the tiny model in seconds (as tests/integration/test_training.py does).
        "FEEDLOOP_TRAINING__EPOCHS": "10",
        "FEEDLOOP_TRAINING__BATCH_SIZE": "8",
        "FEEDLOOP_TRAINING__MICRO_BATCH_SIZE": "8",
        "FEEDLOOP_TRAINING__LEARNING_RATE": "0.01",
        "FEEDLOOP_TRAINING__SFT_WEIGHT": "1.0",
        "FEEDLOOP_TRAINING__MAX_LENGTH": "128",
        "FEEDLOOP_TRAINING__CPU_THREADS": "1",
        "FEEDLOOP_GATE__SMOKE_PROMPTS": json.dumps(SMOKE_PROMPTS),
        "FEEDLOOP_GATE__MIN_ACCURACY": "0.75",
    }
    processes = [
        celery_procs.worker(env, "pairs", concurrency=2),
        celery_procs.worker(env, "train"),
        celery_procs.beat(env, tmp_path / "beat-schedule"),
    ]
    try:
        # Users chat and correct the answers, through the public API (the widget's calls).
        topics = list(FACTS)
        for i in range(USERS):
            topic, user = topics[i % 3], f"e2e-user-{i}"
            answer = chat(live_api, PROMPT_FORMS[(i // 3) % 3].format(topic=topic, i=i), user=user, seed=i)
            vote = httpx.post(
                live_api.base_url + "/v1/feedback",
                json={
                    "completion_id": answer["feedback"]["completion_id"],
                    "token": answer["feedback"]["token"],
                    "rating": "dislike",
                    "correction": FACTS[topic],
                    "user": user,
                },
                timeout=30,
            )
            assert vote.status_code == 202, vote.text
        for process in processes:
            process.wait_ready()

        deadline = time.monotonic() + 240
        new: dict | None = None
        while time.monotonic() < deadline and new is None:
            view = registry(live_api)
            fresh = [a for a in view["adapters"] if a["version"] not in known and a["run_id"]]
            if fresh and fresh[-1]["status"] == "rejected":
                pytest.fail(f"the gate rejected {fresh[-1]['version']}: {fresh[-1]['reasons']}")
            if fresh and view["active"] == fresh[-1]["version"] and view["replica"]["serving"] == view["active"]:
                new = fresh[-1]
            time.sleep(1)
        runs = RunStore(live_api.redis, live_api.keys).recent(3)
        assert new is not None, f"no adapter promoted; runs: {runs}\n{processes[1].log()}"
    finally:
        for process in processes:
            process.stop()
        request.addfinalizer(
            lambda: (serve_base_model(live_api), forget_ephemeral_keys(live_api, workers_stopped=True))
        )

    run = next(r for r in runs if r.get("version") == new["version"])
    assert run["status"] == "promoted" and run["gate"]["passed"] is True
    assert new["dataset_version"] == run["dataset_version"] and new["gate"]["candidate"]["accuracy"] >= 0.75
    assert run["dataset"]["kept"] >= MIN_KEPT
    assert new["activated_by"] == "auto" and new["parent"] is None

    after = chat(live_api, SMOKE_PROMPTS[0], **probe)
    assert after["system_fingerprint"] == new["version"] != before["system_fingerprint"]
    assert after["choices"][0]["message"]["content"] != before["choices"][0]["message"]["content"]
    # What it learned from the corrections, greedily.
    greedy = chat(live_api, SMOKE_PROMPTS[0], temperature=0)["choices"][0]["message"]["content"]
    assert "Paris" in greedy, greedy
