"""The training trigger, lease and fencing against a real Redis, real Celery beat and worker processes.

Each test has its own key prefix in Redis DB 15 (the Celery broker keys share it through kombu's
global_keyprefix), so the processes started here only see this test's tasks.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from services.adapters.registry import AdapterRegistry, StaleFence
from services.core.config import Settings, get_settings
from services.core.keys import Keys
from tests.support import celery_procs
from tests.support.feedback_events import feedback_event, xadd
from tests.support.preference_data import FACTS, PROMPT_FORMS
from workers.celery_app import create_app
from workers.pairing.consumer import FeedbackConsumer
from workers.training.lease import Heartbeat, LeaseClient, LeaseLost
from workers.training.runs import RunStore
from workers.training.trigger import Trigger

REDIS_URL = os.environ.get("FEEDLOOP_LOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass
class LoopEnv:
    redis: redis.Redis
    keys: Keys
    settings: Settings
    env: dict[str, str]
    tmp: Path

    def trigger(self, **overrides: object) -> Trigger:
        settings = self.settings.model_copy(deep=True)
        for name, value in overrides.items():
            setattr(settings.training, name, value)
        return Trigger(redis.Redis.from_url(REDIS_URL), self.keys, settings)

    def runs(self) -> RunStore:
        return RunStore(self.redis, self.keys)

    def seed_pair_ids(self, count: int) -> None:
        """Pair ids in the index: what the trigger counts (it never reads the pairs themselves)."""
        self.redis.zadd(self.keys.pairs_index, {f"pair-{i}": i for i in range(count)})

    def add_correction_pairs(self, count: int) -> None:
        """Real pairs: dislikes with a correction, consumed by the pairing code."""
        topics = list(FACTS)
        for i in range(count):
            topic, other = topics[i % 3], topics[(i + 1) % 3]
            event = feedback_event(
                f"c{i}",
                "dislike",
                f"user-{i}",
                prompt=PROMPT_FORMS[2].format(topic=topic, i=i),  # "Question {i}: ...": no exact duplicates
                response=FACTS[other],
                correction=FACTS[topic],
            )
            xadd(self.redis, self.keys.feedback_stream, event)
        FeedbackConsumer(self.redis, self.keys, self.settings, name="test").consume(60, until_drained=True)
        assert self.redis.zcard(self.keys.pairs_index) == count

    def send_run(self, run_id: str) -> None:
        create_app(self.settings).send_task("train.run", args=[run_id], task_id=run_id)

    def wait(self, condition, timeout: float, what: str, every: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def loop_env(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LoopEnv]:
    prefix = f"loop-test-{uuid.uuid4().hex[:8]}"
    env = {
        "FEEDLOOP_REDIS_URL": REDIS_URL,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_METRICS_PORT": "0",
        "FEEDLOOP_PAIRS__DATA_DIR": str(tmp_path / "datasets"),
        "FEEDLOOP_PAIRS__STRATEGIES": '["correction"]',
        "FEEDLOOP_PAIRS__NEAR_DUPLICATE_THRESHOLD": "1.01",  # the template pairs here are near-duplicates
        "FEEDLOOP_PAIRS__USER_CAP_FRACTION": "1.0",
        "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(tmp_path / "adapters"),
        "FEEDLOOP_TRAINING__MIN_PAIRS": "10",
        "FEEDLOOP_TRAINING__MIN_PAIRS_FLOOR": "5",
        "FEEDLOOP_TRAINING__CHECK_INTERVAL_S": "60",
        "FEEDLOOP_TRAINING__LEASE_TTL_S": "3",
        "FEEDLOOP_TRAINING__CPU_THREADS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield LoopEnv(client, Keys(prefix), Settings(), env, tmp_path)
    finally:
        get_settings.cache_clear()
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


def test_concurrent_checks_start_exactly_one_run_per_window(loop_env: LoopEnv) -> None:
    loop_env.seed_pair_ids(12)
    sent: list[str] = []
    results = []
    barrier = threading.Barrier(8)
    now = time.time()

    def check() -> None:
        trigger = loop_env.trigger()
        barrier.wait()
        results.append(trigger.check(enqueue=sent.append, now=now))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [r for r in results if r.action == "started"]
    assert len(started) == 1 and sent == [started[0].run_id]
    assert {r.reason for r in results if r.action == "skipped"} <= {"run_in_progress", "window_taken"}
    run_id = started[0].run_id
    assert loop_env.runs().get(run_id)["status"] == "queued"  # type: ignore[index]
    assert started[0].decision is not None and started[0].decision.reason == "enough_pairs"

    trigger = loop_env.trigger()
    assert trigger.check(enqueue=sent.append, now=now + 60).reason == "run_in_progress"
    # The run ends; a check in the same window still starts nothing, the next window does.
    loop_env.runs().update(run_id, {"status": "promoted"})
    assert loop_env.runs().release_slot(run_id)
    assert trigger.check(enqueue=sent.append, now=now).reason == "window_taken"
    assert trigger.check(enqueue=sent.append, now=now + 60).action == "started"
    assert len(sent) == 2 and loop_env.redis.zcard(loop_env.keys.runs_index) == 2


def test_not_enough_new_pairs_starts_nothing(loop_env: LoopEnv) -> None:
    loop_env.seed_pair_ids(9)
    result = loop_env.trigger().check(enqueue=lambda run_id: None)
    assert (result.action, result.reason, result.decision.new_pairs) == ("skipped", "waiting_for_pairs", 9)  # type: ignore[union-attr]
    # Past max_interval_s with the floor met, it starts.
    later = time.time() + 25 * 3600
    assert loop_env.trigger().check(enqueue=lambda run_id: None, now=later).reason == "interval_elapsed"


def test_a_due_run_waits_for_the_generated_pairs_pending_when_it_became_due(loop_env: LoopEnv) -> None:
    """The snapshot should hold the weaker-answer pairs of every like voted before the run was due, wherever the
    generation round was; candidates arriving later do not hold the run, and the wait is bounded."""
    loop_env.settings.pairs.strategies = ["correction", "weaker_answer"]
    loop_env.seed_pair_ids(12)
    candidates = loop_env.keys.pairing_candidates("weaker_answer")
    now = time.time()
    loop_env.redis.zadd(candidates, {"liked-before": now - 5})
    sent: list[str] = []
    trigger = loop_env.trigger(generation_wait_s=120.0)

    first = trigger.check(enqueue=sent.append, now=now)
    assert (first.action, first.reason, sent) == ("skipped", "waiting_for_generation", [])
    assert first.decision is not None and first.decision.reason == "enough_pairs"
    loop_env.redis.zadd(candidates, {"liked-after": now + 10})  # voted while the run waits
    assert trigger.check(enqueue=sent.append, now=now + 20).reason == "waiting_for_generation"
    loop_env.redis.zrem(candidates, "liked-before")  # the round wrote its pair (or dropped it)
    started = trigger.check(enqueue=sent.append, now=now + 30)
    assert (started.action, started.reason, sent) == ("started", "enough_pairs", [started.run_id])
    assert loop_env.redis.hget(loop_env.keys.training_state, "due_at") is None  # the next run waits afresh
    assert loop_env.runs().get(started.run_id)["trigger"]["waited_for_generation_s"] == 30.0  # type: ignore[index]

    # The next due run: a candidate that never clears holds it for generation_wait_s, no longer.
    run_id = started.run_id
    assert run_id is not None
    loop_env.runs().update(run_id, {"status": "promoted"})
    assert loop_env.runs().release_slot(run_id)
    later = now + 600
    loop_env.redis.zadd(candidates, {"liked-failing": later - 1})
    assert trigger.check(enqueue=sent.append, now=later).reason == "waiting_for_generation"
    assert trigger.check(enqueue=sent.append, now=later + 119).reason == "waiting_for_generation"
    assert trigger.check(enqueue=sent.append, now=later + 120).action == "started"
    assert len(sent) == 2
    # `feedloop train --now` and a zero wait never wait.
    assert loop_env.trigger(generation_wait_s=0.0).pending_generation(later) == 0


def test_no_run_starts_while_a_canary_is_deciding(loop_env: LoopEnv) -> None:
    """A candidate trained now could not be promoted before live votes decide the running canary."""
    loop_env.seed_pair_ids(50)
    loop_env.redis.set(loop_env.keys.canary_adapter, "feedloop-v7")
    sent: list[str] = []
    result = loop_env.trigger().check(enqueue=sent.append)
    assert (result.action, result.reason, sent) == ("skipped", "canary_running", [])
    assert loop_env.trigger().check(enqueue=sent.append, force=True).action == "started"  # an operator may
    loop_env.redis.delete(loop_env.keys.canary_adapter)
    assert loop_env.runs().current() is not None  # the forced run holds the slot


def test_two_beat_processes_start_one_run(loop_env: LoopEnv) -> None:
    env = {**loop_env.env, "FEEDLOOP_TRAINING__CHECK_INTERVAL_S": "1"}
    loop_env.seed_pair_ids(12)
    worker = celery_procs.worker(env, "pairs", concurrency=2).wait_ready()
    beats = [celery_procs.beat(env, loop_env.tmp / f"beat-{i}") for i in range(2)]
    try:
        for b in beats:
            b.wait_ready()
        checks = loop_env.wait(
            lambda: (n := worker.log(10**7).count("Task train.check[")) >= 12 and n,
            timeout=120,
            what="a dozen train.check tasks from the two beats",
        )
    finally:
        for b in beats:
            b.stop()
        worker.stop()
    assert checks >= 12
    runs = loop_env.runs().recent()
    assert len(runs) == 1 and runs[0]["status"] == "queued"
    # One train.run message on the broker's train queue, with the run id as its task id.
    queue_key = f"{loop_env.keys.prefix}:celery:train"
    messages = loop_env.redis.lrange(queue_key, 0, -1)
    assert len(messages) == 1 and runs[0]["run_id"].encode() in messages[0]


def test_a_stale_lease_holder_cannot_write(loop_env: LoopEnv) -> None:
    trigger = loop_env.trigger()
    registry = AdapterRegistry(loop_env.redis, loop_env.keys)
    leases = LeaseClient(loop_env.redis, loop_env.keys, ttl_s=1.0)
    first = trigger.check(force=True).run_id
    assert first is not None
    a = leases.acquire_for_run(first, "worker-a")
    leases.hset(a, loop_env.keys.run(first), {"note": "a was here"})
    # worker-a stops renewing (paused, partitioned): its lease expires.
    loop_env.wait(lambda: not loop_env.redis.exists(loop_env.keys.training_lease), 5, "the lease to expire", 0.05)

    assert trigger.recover_stale() == [first]
    second = trigger.check(force=True).run_id
    assert second is not None and second != first
    b = leases.acquire_for_run(second, "worker-b")
    assert b.token > a.token

    # worker-a wakes up and tries to finish its run: every write is refused.
    with pytest.raises(LeaseLost):
        leases.hset(a, loop_env.keys.run(first), {"status": "promoted"})
    with pytest.raises(LeaseLost):
        leases.rpush(a, loop_env.keys.run_history(first), "{}")
    with pytest.raises(StaleFence):
        registry.register("feedloop-v1", "/adapters/a", run_id=first, fence=a.fence)
    assert registry.get("feedloop-v1") is None
    run_a = loop_env.runs().get(first)
    assert run_a is not None and run_a["status"] == "failed" and run_a["note"] == "a was here"
    assert loop_env.redis.llen(loop_env.keys.run_history(first)) == 0
    # worker-a's heartbeat notices it lost the lease; worker-b's writes go through.
    with Heartbeat(leases, a) as heartbeat:
        assert heartbeat.lost.wait(5.0)
        with pytest.raises(LeaseLost):
            heartbeat.check()
    registry.register("feedloop-v1", "/adapters/b", run_id=second, fence=b.fence)
    assert registry.promote("feedloop-v1", auto=True, fence=b.fence).outcome == "promoted"
    # A queued run nobody picked up is given up after training.queue_timeout_s.
    leases.release(b)
    loop_env.runs().update(second, {"status": "promoted"})
    loop_env.runs().release_slot(second)
    third = trigger.check(force=True).run_id
    assert loop_env.trigger(queue_timeout_s=5).recover_stale(now=time.time() + 6) == [third]


def reported_past_first_step(loop_env: LoopEnv, run_id: str) -> list[dict] | None:
    """The run's history in Redis once it holds a training step's record (after the reference pass's records)."""
    history = [json.loads(raw) for raw in loop_env.redis.lrange(loop_env.keys.run_history(run_id), 0, -1)]
    return history if any(record.get("phase") != "reference" for record in history) else None


def test_sigkill_of_a_train_worker_mid_run_fails_the_run_once(loop_env: LoopEnv) -> None:
    loop_env.add_correction_pairs(24)
    env = {**loop_env.env, "FEEDLOOP_TRAINING__EPOCHS": "1000", "FEEDLOOP_TRAINING__BATCH_SIZE": "4"}
    trigger = loop_env.trigger()
    worker = celery_procs.worker(env, "train").wait_ready()
    try:
        result = trigger.check(enqueue=loop_env.send_run)
        assert result.action == "started" and result.run_id is not None
        run_id = result.run_id
        history = loop_env.wait(
            lambda: reported_past_first_step(loop_env, run_id),
            timeout=240,
            what=f"training steps of {run_id}:\n{worker.log()}",
        )
        # The reference log-prob pass before the first step reports each batch into the run's history.
        reference = [record for record in history if record.get("phase") == "reference"]
        assert reference and history[: len(reference)] == reference
        assert [record["step"] for record in reference] == list(range(1, len(reference) + 1))
        assert {record["total_steps"] for record in reference} == {len(reference)} and reference[-1]["eta_s"] == 0
        run = loop_env.runs().get(run_id)
        assert run is not None and run["status"] == "running" and run["dataset_version"] == "ds-000001"
        worker.kill()
    finally:
        worker.kill()
    token = run["token"]
    if (loop_env.redis.pttl(loop_env.keys.training_lease) or 0) > 500:
        assert trigger.recover_stale() == []  # the lease has not expired yet: it could still be alive
    loop_env.wait(lambda: not loop_env.redis.exists(loop_env.keys.training_lease), 10, "the lease to expire")
    checked = trigger.check(enqueue=loop_env.send_run)
    assert checked.recovered == [run_id]
    assert (checked.action, checked.reason) == ("skipped", "backing_off_after_failure")  # no doomed retry
    failed = loop_env.runs().get(run_id)
    assert failed is not None and failed["status"] == "failed" and "lease expired" in failed["error"]
    assert loop_env.runs().current() is None
    steps = loop_env.redis.llen(loop_env.keys.run_history(run_id))

    # The same task delivered again (a broker redelivery) on a live worker does not run it a second time.
    again = celery_procs.worker(env, "train").wait_ready()
    try:
        loop_env.send_run(run_id)
        loop_env.wait(lambda: f"Task train.run[{run_id}] succeeded" in again.log(), 120, "the redelivered task")
    finally:
        again.stop()
    assert loop_env.runs().get(run_id)["status"] == "failed"  # type: ignore[index]
    assert loop_env.redis.llen(loop_env.keys.run_history(run_id)) == steps
    assert int(loop_env.redis.get(loop_env.keys.fencing_counter)) == token  # no second lease was ever taken
    assert not loop_env.redis.exists(loop_env.keys.training_lease)


def test_a_run_started_while_a_lost_one_still_trains_in_the_same_process_waits_for_it(
    loop_env: LoopEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose lease vanished (expired, or a Redis that lost its data) trains on until it next checks; the
    next run, started in the same worker process meanwhile, must not train beside it (TRL's trainers share
    process-wide state, and one's teardown broke the other's step): it waits, then trains and finishes, while
    the lost run ends failed."""
    from workers.training import trainer
    from workers.training.job import execute
    from workers.training.runs import TERMINAL

    loop_env.add_correction_pairs(24)
    trigger = loop_env.trigger()
    results: dict[str, dict] = {}
    entered: dict[str, float] = {}  # run id -> when its run_training call began
    left: dict[str, float] = {}  # run id -> when it returned or raised
    original = trainer.run_training

    def timed_run_training(settings, dataset_dir, output_dir, run_id, *args, **kwargs):
        entered[run_id] = time.monotonic()
        try:
            return original(settings, dataset_dir, output_dir, run_id, *args, **kwargs)
        finally:
            left[run_id] = time.monotonic()

    monkeypatch.setattr(trainer, "run_training", timed_run_training)

    def run(name: str, run_id: str) -> threading.Thread:
        def target() -> None:
            results[name] = execute(redis.Redis.from_url(REDIS_URL), loop_env.keys, loop_env.settings, run_id)

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    first = trigger.check(force=True).run_id
    assert first is not None
    first_thread = run("first", first)
    loop_env.wait(lambda: first in entered, 60, "the first run to start training", 0.01)
    loop_env.redis.delete(loop_env.keys.training_lease)
    assert trigger.recover_stale() == [first]
    second = trigger.check(force=True).run_id
    assert second is not None and second != first
    second_thread = run("second", second)
    first_thread.join(300)
    second_thread.join(300)
    assert results["first"]["status"] == "failed"
    assert results["second"]["status"] in TERMINAL - {"failed"}, results["second"]
    assert entered[second] >= left[first]  # never two trainings at once in one process
