"""Canary rollouts decided by live votes, on the real stack: two `feedloop serve` replicas (vLLM on CPU, the
tiny model) on one Redis, a Celery worker on ``pairs`` and beat running ``canary.check``, and simulated users
chatting and voting through the public API.

The users ask about three topics and like an answer that states the topic's fact (tests/support/
preference_data.py), greedy, so each version's answers are fixed. The "good" candidate is a DPO adapter trained
(TRL + PEFT, here, in seconds) on that preference; the "bad" one on the opposite preference (chosen and rejected
swapped); the first active version and the stickiness and hard-failure cases use random-weight LoRA folders
(tests/support/adapter_corpus.py). A candidate enters the canary the way training's auto-promotion starts it
(``registry.promote(V, auto=True, canary_share=...)``).

The tests share one deployment: stickiness (two replicas, a restart) and a good canary promoted, a bad one
rolled back, a degenerate one rejected without a vote, operators' overrides. Each makes the active version it
needs when it runs first (`pytest -p randomly` shuffles them).
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from services.adapters.canary import canary_bucket
from services.adapters.registry import AdapterRegistry
from services.core.keys import Keys
from tests.conftest import (
    ADMIN_TOKEN,
    ARTIFACTS,
    FEEDBACK_SECRET,
    TEST_REDIS_URL,
    ServerProcess,
    delete_prefix,
    free_port,
    launch_feedloop,
    wait_ready,
)
from tests.support import celery_procs
from tests.support.adapter_corpus import publish_lora
from tests.support.preference_data import FACTS
from tests.support.trained_adapters import publish_result, train_on_preferences
from workers.training.trainer import TrainingResult

ALIAS = "feedloop"
SHARE = 0.3
USERS = [f"canary-user-{i}" for i in range(30)]
PROMPTS = {f"Tell me about {topic}.": fact for topic, fact in FACTS.items()}  # prompt -> the answer users like
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USERS_AT_ONCE = 4  # concurrent users: the engines batch them


@dataclass
class Deployment:
    env: dict[str, str]
    replicas: list[ServerProcess]
    ports: list[int]
    redis: redis.Redis
    keys: Keys
    adapters_dir: Path
    model_dir: Path

    @property
    def registry(self) -> AdapterRegistry:
        return AdapterRegistry(self.redis, self.keys)

    def publish(self, seed: int, **lora: float) -> str:
        version = self.registry.next_version()
        path = publish_lora(self.model_dir, self.adapters_dir, version, seed=seed, **lora)
        self.registry.register(version, str(path), run_id=f"run-{version}")
        return version

    def publish_trained(self, result: TrainingResult) -> str:
        version = self.registry.next_version()
        path = publish_result(result, self.adapters_dir, version)
        self.registry.register(version, str(path), run_id=result.run_id)
        return version

    def restart(self, i: int) -> None:
        self.replicas[i].stop()
        self.replicas[i] = wait_ready(launch_replica(self.env, self.ports[i], i))


def launch_replica(env: dict[str, str], port: int, i: int) -> ServerProcess:
    log = ARTIFACTS / "logs" / f"canary-replica-{i}-{uuid.uuid4().hex[:6]}.log"
    return launch_feedloop(["serve"], {**env, "FEEDLOOP_API__PORT": str(port)}, port, log)


@pytest.fixture(scope="module")
def d(
    tiny_model_dir: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    prefix = f"canary-{uuid.uuid4().hex[:8]}"
    data_dir = tmp_path_factory.mktemp("canary-data")
    env = {
        "FEEDLOOP_REDIS_URL": TEST_REDIS_URL,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_DATA_DIR": str(data_dir),
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "512",
        "FEEDLOOP_API__ADMIN_TOKEN": ADMIN_TOKEN,
        "FEEDLOOP_FEEDBACK__SECRET": FEEDBACK_SECRET,
        "FEEDLOOP_FEEDBACK__RATE_PER_IP": "10000",
        "FEEDLOOP_FEEDBACK__BURST_PER_IP": "100000",
        "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(data_dir / "adapters"),
        "FEEDLOOP_PAIRS__DATA_DIR": str(data_dir / "datasets"),
        "FEEDLOOP_PAIRS__STRATEGIES": '["same_prompt"]',
        "FEEDLOOP_TRAINING__CHECK_INTERVAL_S": "3600",
        "FEEDLOOP_METRICS_PORT": "0",
        "FEEDLOOP_GATE__RECONCILE_INTERVAL_S": "1",
        # small numbers keep the live decisions to seconds (the rule's defaults are calibrated by the bench)
        "FEEDLOOP_CANARY__SHARE": str(SHARE),
        "FEEDLOOP_CANARY__MIN_VOTES": "6",
        "FEEDLOOP_CANARY__MIN_USERS": "3",
        "FEEDLOOP_CANARY__MIN_REQUESTS": "4",
        "FEEDLOOP_CANARY__CHECK_INTERVAL_S": "1",
    }
    ports = [free_port(), free_port()]
    replicas: list[ServerProcess] = []
    processes: list[celery_procs.CeleryProcess] = []
    try:
        # everything starts at once; the replicas' engines load side by side
        replicas = [launch_replica(env, port, i) for i, port in enumerate(ports)]
        processes = [
            celery_procs.worker(env, "pairs", concurrency=2),
            celery_procs.beat(env, data_dir / "beat-schedule"),
        ]
        for replica in replicas:
            wait_ready(replica)
        for process in processes:
            process.wait_ready()
        yield Deployment(env, replicas, ports, redis_client, Keys(prefix), data_dir / "adapters", tiny_model_dir)
    finally:
        for process in processes:
            process.stop()
        for replica in replicas:
            replica.stop(signal.SIGTERM)
        delete_prefix(redis_client, prefix)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainingResult]:
    """The users' own preference ("good") and its opposite ("bad"), each trained from the base model."""
    workdir = tmp_path_factory.mktemp("canary-training")
    return {
        "good": train_on_preferences(tiny_model_dir, workdir, "good"),
        "bad": train_on_preferences(tiny_model_dir, workdir, "bad", flip=True),
    }


def chat(base_url: str, model: str, prompt: str, user: str | None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}
    if user is not None:
        body["user"] = user
    response = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


def vote(base_url: str, answer: dict, user: str, rating: str) -> None:
    feedback = answer["feedback"]
    response = httpx.post(
        base_url + "/v1/feedback",
        json={"completion_id": feedback["completion_id"], "token": feedback["token"], "rating": rating, "user": user},
        timeout=30,
    )
    assert response.status_code == 202, response.text


def wait_for(what: str, check, timeout: float = 120, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def replicas_serving_canary(d: Deployment, version: str) -> bool:
    for replica in d.replicas:
        state = httpx.get(replica.base_url + "/admin/adapters/canary", headers=ADMIN, timeout=30).json()
        if (state["replica"] or {}).get("version") != version:
            return False
    return True


def start_canary(d: Deployment, version: str) -> None:
    assert d.registry.promote(version, auto=True, by="auto", canary_share=SHARE).outcome == "canary"
    wait_for(f"{version} loaded as the canary on both replicas", lambda: replicas_serving_canary(d, version))


def canary_users(version: str) -> set[str]:
    return {u for u in USERS if canary_bucket(version, u) < SHARE}


def run_users(
    d: Deployment,
    vote_on_answers: bool,
    prompts: int = len(PROMPTS),
    replica_offset: int = 0,
    until: Callable[[], bool] | None = None,
) -> dict[str, set[str]]:
    """Every user asks the first ``prompts`` prompts once, alternating replicas (user i's prompt j goes to replica
    i + j + replica_offset), a few users at a time; with ``vote_on_answers`` they like an answer that states the
    prompt's fact and dislike any other. Users who have not started once ``until()`` holds (a decision is made)
    do not chat. Returns each user's served versions."""
    served: dict[str, set[str]] = {u: set() for u in USERS}

    def one_user(i: int, user: str) -> None:
        if until is not None and until():
            return
        for j, prompt in enumerate(list(PROMPTS)[:prompts]):
            base_url = d.replicas[(i + j + replica_offset) % 2].base_url
            answer = chat(base_url, ALIAS, prompt, user)
            served[user].add(answer["system_fingerprint"])
            if vote_on_answers:
                vote(base_url, answer, user, "like" if PROMPTS[prompt] in text(answer) else "dislike")

    with ThreadPoolExecutor(max_workers=USERS_AT_ONCE) as pool:
        for future in [pool.submit(one_user, i, user) for i, user in enumerate(USERS)]:
            future.result()
    return served


def decided(d: Deployment, version: str) -> Callable[[], bool]:
    """Whether the canary of ``version`` has ended (the users can stop: the votes after it change nothing)."""
    return lambda: (record := d.registry.get(version)) is not None and record.status != "canary"


def interaction_versions(d: Deployment, until: float) -> dict[str, set[str]]:
    """Each user's versions as the stored interactions (the API's own records) say, for the requests started
    before ``until`` (the canary's end: the records keep whole seconds, so the last second is left out)."""
    seen: dict[str, set[str]] = {}
    for key in d.redis.scan_iter(match=d.keys.interaction("*"), count=1000):
        raw = d.redis.get(key)
        if raw:
            record = orjson.loads(raw)
            if record.get("user") and record.get("model") == ALIAS and record["created_at"] < int(until):
                seen.setdefault(record["user"], set()).add(record.get("adapter") or "base")
    return seen


def assert_only_its_share_saw(seen: dict[str, set[str]], canary: str, active: str) -> None:
    """During the canary every user who chatted saw one version: the canary for its share, the active one
    for everyone else (users later in the loop may not have chatted before the decision)."""
    expected = canary_users(canary)
    for user, versions in seen.items():
        assert versions == ({canary} if user in expected else {active}), (user, versions)
    assert any(canary in versions for versions in seen.values())
    assert any(active in versions for versions in seen.values())


def clear_interactions(d: Deployment) -> None:
    for key in d.redis.scan_iter(match=d.keys.interaction("*"), count=1000):
        d.redis.delete(key)


def promote_now(d: Deployment, version: str) -> None:
    """Make version active straight away (no canary) and wait until both replicas' alias serves it."""
    d.registry.promote(version)
    wait_for(f"{version} active on both replicas", lambda: all(
        httpx.get(r.base_url + "/admin/engine", headers=ADMIN, timeout=30).json()["aliases"][ALIAS] == version
        for r in d.replicas
    ))  # fmt: skip


def current_active(d: Deployment) -> str:
    """The active version, after making one active when this test runs first (the tests run in any order)."""
    active = d.registry.view().active
    if active is None:
        active = d.publish(seed=5, std=1.0)
        promote_now(d, active)
    return active


def test_the_canary_is_sticky_across_replicas_and_a_restart_and_a_good_one_is_promoted(
    d: Deployment, trained: dict[str, TrainingResult]
) -> None:
    active = d.publish(seed=5, std=1.0)
    promote_now(d, active)
    good = d.publish_trained(trained["good"])
    start_canary(d, good)
    expected = canary_users(good)
    assert 0 < len(expected) < len(USERS)
    # a request naming a version is never rerouted
    for user in sorted(expected)[:2]:
        assert chat(d.replicas[1].base_url, active, next(iter(PROMPTS)), user)["system_fingerprint"] == active
    # each user asks one replica before the restart and the other one after it
    served = run_users(d, vote_on_answers=False, prompts=1)
    d.restart(1)
    assert replicas_serving_canary(d, good)  # ready only once the canary is loaded too
    after = run_users(d, vote_on_answers=False, prompts=1, replica_offset=1)
    for user in USERS:
        both = served[user] | after[user]
        assert both == ({good} if user in expected else {active}), (user, both)

    clear_interactions(d)
    started = time.time()
    run_users(d, vote_on_answers=True, until=decided(d, good))
    record = wait_for(
        "the canary's promotion",
        lambda: (r := d.registry.get(good)) is not None and r.status == "active" and r,
        timeout=60,
    )
    print(f"live canary: first chat of the voting users -> promotion in {record.canary_ended_at - started:.1f}s")
    assert record.canary_outcome == "promoted" and d.registry.view().previous == active
    decision = record.canary_decision
    assert decision["outcome"] == "promote" and decision["compared_to"] == active
    assert decision["canary"]["users"] >= 3 and decision["canary"]["like_rate"] > decision["active"]["like_rate"]
    assert_only_its_share_saw(interaction_versions(d, record.canary_ended_at), good, active)  # type: ignore[arg-type]


def test_a_bad_canary_is_rolled_back_and_only_its_share_saw_it(
    d: Deployment, trained: dict[str, TrainingResult]
) -> None:
    active = d.registry.view().active
    record = d.registry.get(active) if active else None
    if record is None or record.run_id != trained["good"].run_id:  # this test ran first: the users' adapter serves
        active = d.publish_trained(trained["good"])
        promote_now(d, active)
    bad = d.publish_trained(trained["bad"])
    start_canary(d, bad)
    clear_interactions(d)
    started = time.time()
    run_users(d, vote_on_answers=True, until=decided(d, bad))
    record = wait_for(
        "the canary's rollback",
        lambda: (r := d.registry.get(bad)) is not None and r.status == "retired" and r,
        timeout=60,
    )
    assert record.canary_outcome == "rolled_back" and record.canary_decision["outcome"] == "rollback"
    assert record.reasons[0].startswith("canary rollback: worse than active"), record.reasons
    assert record.canary_decision["upper"] < 0
    assert d.registry.view().active == active
    assert_only_its_share_saw(interaction_versions(d, record.canary_ended_at), bad, active)  # type: ignore[arg-type]
    wait_for("no canary served", lambda: all(
        httpx.get(r.base_url + "/admin/adapters/canary", headers=ADMIN, timeout=30).json()["replica"] is None
        for r in d.replicas
    ))  # fmt: skip
    print(f"live canary: first chat of the voting users -> rollback in {record.canary_ended_at - started:.1f}s")


def test_a_degenerate_canary_is_rejected_without_votes(d: Deployment) -> None:
    active = current_active(d)
    degenerate = d.publish(seed=3, fill=0.5)
    start_canary(d, degenerate)
    run_users(d, vote_on_answers=False, until=decided(d, degenerate))
    record = wait_for(
        "the degenerate canary's rejection",
        lambda: (r := d.registry.get(degenerate)) is not None and r.status == "rejected" and r,
        timeout=60,
    )
    assert record.reject_code == "canary_failure" and "degenerate rate" in record.reasons[0]
    assert d.registry.view().active == active
    assert not d.redis.exists(d.keys.canary_votes(degenerate))  # decided without a single vote


def test_operators_abort_through_the_admin_api_and_a_replica_that_cannot_load_the_canary_ends_it(
    d: Deployment,
) -> None:
    active = current_active(d)
    api = d.replicas[0].base_url + "/admin/adapters/canary"
    version = d.publish(seed=7, std=1.0)
    start_canary(d, version)
    status = httpx.get(api, headers=ADMIN, timeout=30).json()
    assert (status["canary"]["version"], status["canary"]["canary_of"], status["active"]) == (version, active, active)
    assert httpx.post(api + "/abort", json={"reason": "looks off"}, timeout=30).status_code == 401  # admin only
    aborted = httpx.post(api + "/abort?wait=true", json={"reason": "looks off"}, headers=ADMIN, timeout=60)
    assert aborted.status_code == 200, aborted.text
    assert (aborted.json()["version"], aborted.json()["canary"], aborted.json()["active"]) == (version, None, active)
    record = d.registry.get(version)
    assert record is not None and (record.status, record.reasons) == ("retired", ["looks off"])
    for route in ("/abort", "/promote"):
        refused = httpx.post(api + route, json={}, headers=ADMIN, timeout=30)
        assert (refused.status_code, refused.json()["error"]["code"]) == (409, "no_canary")

    # a canary whose folder this deployment cannot read: every replica fails to load it, the first ends it
    missing = d.registry.next_version()
    d.registry.register(missing, str(d.adapters_dir / "not-mounted" / missing), run_id=f"run-{missing}")
    assert d.registry.promote(missing, auto=True, canary_share=SHARE).outcome == "canary"
    record = wait_for(
        "the unloadable canary's end",
        lambda: (r := d.registry.get(missing)) is not None and r.status != "canary" and r,
        timeout=60,
    )
    assert record.status == "retired" and record.canary_outcome == "rolled_back"  # local trouble: not rejected
    assert "could not serve the canary" in record.reasons[0] and record.canary_decision["hard_failure"] == "replica"
    assert d.registry.view().active == active
    metrics = "".join(httpx.get(r.base_url + "/metrics", timeout=30).text for r in d.replicas)
    assert 'feedloop_canary_decisions_total{outcome="replica_failure"} 1.0' in metrics
