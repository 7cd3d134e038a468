"""The pairing worker against a real Redis and a REAL Celery worker process.

Each test gets its own key prefix in Redis DB 15 (FEEDLOOP_REDIS_PREFIX; the Celery broker keys share it
through kombu's global_keyprefix), so the worker started here only ever sees this test's tasks and stream.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import redis

from services.core.config import Settings, get_settings
from services.core.keys import Keys
from services.feedback.events import parse_event
from tests.support.feedback_events import entry, feedback_event, xadd
from tests.support.redis_server import private_redis
from workers.celery_app import create_app
from workers.pairing import datasets, quality
from workers.pairing import rules as pairing
from workers.pairing.consumer import FeedbackConsumer
from workers.pairing.store import PairsStore

REPO = Path(__file__).resolve().parents[3]
REDIS_URL = os.environ.get("FEEDLOOP_PAIRS_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
ARTIFACTS = REPO / "test-artifacts" / "logs"


@dataclass
class PairsEnv:
    redis: redis.Redis
    keys: Keys
    settings: Settings
    env: dict[str, str]
    tmp: Path

    def consumer(self, name: str = "test") -> FeedbackConsumer:
        return FeedbackConsumer(self.redis, self.keys, self.settings, name=name)

    def pair_ids(self) -> set[str]:
        return {p.decode() for p in self.redis.zrange(self.keys.pairs_index, 0, -1)}

    def pair(self, pid: str) -> dict:
        return orjson.loads(self.redis.get(self.keys.pair(pid)))

    def stats(self) -> quality.PairStats:
        return quality.read_stats(self.redis, self.keys.pairs_stats)

    def backlog(self) -> tuple[int, int | None]:
        return self.consumer("probe").group_backlog()

    def wait_drained(self, expected_entries: int, timeout: float = 120) -> None:
        """Until every entry was delivered to the group and none is pending."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            groups = (
                self.redis.xinfo_groups(self.keys.feedback_stream)
                if self.redis.exists(self.keys.feedback_stream)
                else []
            )
            for group in groups:
                if group["name"].decode() == self.settings.pairs.consumer_group:
                    delivered_all = group["lag"] == 0 and group["entries-read"] >= expected_entries
                    if delivered_all and group["pending"] == 0:
                        return
            time.sleep(0.05)
        raise AssertionError(f"stream not drained in {timeout}s: {self.redis.xinfo_groups(self.keys.feedback_stream)}")


@pytest.fixture
def pairs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PairsEnv]:
    yield from _pairs_env(REDIS_URL, tmp_path, monkeypatch)


@pytest.fixture
def private_pairs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PairsEnv]:
    """pairs_env on a redis-server of the test's own, for server-wide operations (SCRIPT FLUSH)."""
    with private_redis(tmp_path / "redis") as server:
        yield from _pairs_env(server.url, tmp_path, monkeypatch)


def _pairs_env(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PairsEnv]:
    prefix = f"pairs-test-{uuid.uuid4().hex[:8]}"
    env = {
        "FEEDLOOP_REDIS_URL": url,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_PAIRS__STRATEGIES": '["same_prompt", "correction"]',
        "FEEDLOOP_PAIRS__CLAIM_IDLE_MS": "500",
        "FEEDLOOP_PAIRS__MAX_DELIVERIES": "3",
        "FEEDLOOP_PAIRS__BATCH_SIZE": "100",
        "FEEDLOOP_PAIRS__BLOCK_MS": "100",
        "FEEDLOOP_PAIRS__USER_CAP_FRACTION": "1.0",
        "FEEDLOOP_PAIRS__DATA_DIR": str(tmp_path / "datasets"),
        "FEEDLOOP_ENGINE__MODEL": str(tmp_path / "no-model"),  # token limits fall back to the heuristic
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    client = redis.Redis.from_url(url)
    try:
        yield PairsEnv(client, Keys(prefix), Settings(), env, tmp_path)
    finally:
        get_settings.cache_clear()
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
        client.close()


class CeleryWorker:
    """`celery -A workers.celery_app worker -Q pairs` as a subprocess in its own process group."""

    def __init__(self, env: dict[str, str], name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"pairs-worker-{name}-{uuid.uuid4().hex[:6]}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            "pairs",
            "-c",
            "1",
            "-P",
            "prefork",
            "-n",
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "INFO",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=REPO,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_ready()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"celery worker not ready in {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL the whole group: the main process and its pool child die mid-whatever."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Warm shutdown: the main process lets a running task finish, then exits with its pool."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def start_worker(pairs_env: PairsEnv) -> Iterator:
    workers: list[CeleryWorker] = []

    def start(name: str = "pairs") -> CeleryWorker:
        worker = CeleryWorker(pairs_env.env, name)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def send_consume(pairs_env: PairsEnv, seconds: float = 90) -> None:
    app = create_app(pairs_env.settings)
    app.send_task("pairs.consume", kwargs={"max_seconds": seconds, "until_drained": True})


# --- the scenario -----------------------------------------------------------------------------------------


def scenario() -> tuple[list[dict], dict[str, tuple[str, ...]]]:
    """Events in arrival order, and the pairs they must leave: name -> (strategy, *source ids)."""
    japan, italy = "Capital of Japan?", "Capital of Italy?"
    events = [
        feedback_event("c1", "like", "u1", response="Four."),
        feedback_event("c2", "dislike", "u2", prompt="What is  two plus two? ", response="Five."),
        feedback_event("c3", "dislike", "u3", system="Answer in French.", response="Cinq."),  # other prompt
        feedback_event(
            "c4",
            "dislike",
            "u4",
            prompt="Capital of France?",
            response="Lyon.",
            correction="Paris. Write to me at ann@example.com",
        ),
        feedback_event("c5", "like", "u5", prompt=japan, response="Tokyo."),
        feedback_event("c6", "dislike", "u6", prompt=japan, response="Kyoto."),  # pair c5 > c6 ...
        feedback_event("c6", "like", "u7", prompt=japan, response="Kyoto."),
        feedback_event("c6", "like", "u8", prompt=japan, response="Kyoto."),  # ... until c6 is liked too
        feedback_event("c7", "like", "u1", prompt=italy, response="Rome."),
        feedback_event("c8", "dislike", "u2", prompt=italy, response="Milan."),  # pair c7 > c8 ...
        feedback_event("c7", "withdrawn", "u1", prompt=italy, response="Rome."),  # ... until withdrawn
        feedback_event("c9", "like", "u9", prompt=italy, response="Rome, of course."),  # pair c9 > c8
    ]
    correction = pairing.text_hash("Paris. Write to me at ann@example.com")
    expected = {
        "c1>c2": ("same_prompt", "c1", "c2"),
        "c4 corrected": ("correction", "c4", "u4", correction),
        "c5>c6": ("same_prompt", "c5", "c6"),
        "c7>c8": ("same_prompt", "c7", "c8"),
        "c9>c8": ("same_prompt", "c9", "c8"),
    }
    return events, expected


def test_events_become_the_expected_pairs_through_a_celery_worker(pairs_env: PairsEnv, start_worker):
    events, expected = scenario()
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    start_worker()
    send_consume(pairs_env)
    pairs_env.wait_drained(len(events))

    ids = {name: pairing.pair_id(*spec) for name, spec in expected.items()}
    assert pairs_env.pair_ids() == set(ids.values())
    c1c2 = pairs_env.pair(ids["c1>c2"])
    assert c1c2["chosen"] == [{"role": "assistant", "content": "Four."}]
    assert c1c2["rejected"] == [{"role": "assistant", "content": "Five."}]
    assert c1c2["users"] == ["u1", "u2"] and len(c1c2["feedback_ids"]) == 2
    assert c1c2["feedback_ids"][0] == events[0]["feedback_id"]
    corrected = pairs_env.pair(ids["c4 corrected"])
    assert corrected["chosen"][0]["content"] == "Paris. Write to me at [EMAIL]"  # scrubbed
    assert corrected["rejected"][0]["content"] == "Lyon."
    stats = pairs_env.stats()
    assert stats.created == {"same_prompt": 4, "correction": 1} and stats.pii == {"email": 1}

    # the snapshot keeps only pairs whose votes still hold
    manifest = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert manifest["version"] == "ds-000001"
    assert manifest["counts"]["stored"] == 5 and manifest["counts"]["kept"] == 3
    assert manifest["filters"] == {"superseded:votes_changed": 2}
    assert manifest["strategies"] == {"same_prompt": 2, "correction": 1}
    folder = Path(manifest["path"])
    rows = [orjson.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (folder / name).open("rb")]
    assert {r["pair_id"] for r in rows} == {ids["c1>c2"], ids["c4 corrected"], ids["c9>c8"]}
    # A snapshot this small holds out more than eval_fraction (pairs.min_eval_pairs), up to max_eval_fraction.
    cfg, threshold = pairs_env.settings.pairs, manifest["eval_threshold"]
    assert cfg.eval_fraction <= threshold <= cfg.max_eval_fraction
    assert manifest["counts"]["eval"] == sum(datasets.is_eval(r["pair_id"], threshold) for r in rows)
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "pair_id"}
    kto = [orjson.loads(line) for line in (folder / "kto.jsonl").open("rb")]
    labels = {r["completion"][0]["content"]: r["label"] for r in kto}
    assert labels == {
        "Four.": True,
        "Five.": False,
        "Cinq.": False,
        "Lyon.": False,
        "Tokyo.": True,
        "Kyoto.": True,
        "Milan.": False,
        "Rome, of course.": True,
    }
    assert datasets.count_new_pairs(pairs_env.redis, pairs_env.keys, "ds-000001") == 0
    assert orjson.loads(pairs_env.redis.get(pairs_env.keys.dataset("ds-000001")))["counts"] == manifest["counts"]

    # a later vote makes a new pair, counted as new since the version
    xadd(
        pairs_env.redis,
        pairs_env.keys.feedback_stream,
        feedback_event("c10", "dislike", "u3", response="Six."),
    )
    pairs_env.consumer().consume(10, until_drained=True)
    assert datasets.count_new_pairs(pairs_env.redis, pairs_env.keys, "ds-000001") == 1
    assert pairing.pair_id("same_prompt", "c1", "c10") in pairs_env.pair_ids()
    # The next version never raises the held-out bar over pairs the previous one trained on.
    assert datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)["eval_threshold"] <= threshold


def test_redelivered_entries_add_nothing(pairs_env: PairsEnv):
    events, expected = scenario()
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    consumer = pairs_env.consumer()
    consumer.ensure_ready()
    entries = consumer.read_new(None)
    first = consumer.process(entries)
    before = (pairs_env.pair_ids(), pairs_env.redis.hgetall(pairs_env.keys.pairs_stats))
    again = consumer.process(entries)  # the same entries delivered a second time
    assert first.pairs_written == len(expected) and again.pairs_written == 0
    assert (pairs_env.pair_ids(), pairs_env.redis.hgetall(pairs_env.keys.pairs_stats)) == before


def test_a_failing_pair_write_holds_back_only_its_own_entry(pairs_env: PairsEnv):
    # a counter that cannot be incremented: the pair that would count an e-mail fails to record
    pairs_env.redis.hset(pairs_env.keys.pairs_stats, quality.pii_field("email"), "not a number")
    events = [
        feedback_event("p1", "like", "u1", prompt="Name a colour.", response="Blue."),
        feedback_event("p2", "dislike", "u2", prompt="Name a colour.", response="Seven."),
        feedback_event("q1", "like", "u1", prompt="Your e-mail?", response="Mail ann@example.com"),
        feedback_event("q2", "dislike", "u2", prompt="Your e-mail?", response="No."),
    ]
    ids = [xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event) for event in events]
    consumer = pairs_env.consumer()
    consumer.ensure_ready()
    report = consumer.process(consumer.read_new(None))

    assert (report.pairs_written, report.failed, report.processed) == (1, 1, 3)
    assert pairing.pair_id("same_prompt", "p1", "p2") in pairs_env.pair_ids()
    pending = pairs_env.redis.xpending_range(
        pairs_env.keys.feedback_stream, pairs_env.settings.pairs.consumer_group, "-", "+", 10
    )
    assert [row["message_id"] for row in pending] == [ids[3]]  # only the vote that derived the failing pair


def test_idle_empty_consumers_are_pruned(pairs_env: PairsEnv):
    consumer = pairs_env.consumer("live")
    consumer.ensure_ready()
    stream, group = pairs_env.keys.feedback_stream, pairs_env.settings.pairs.consumer_group
    pairs_env.redis.xgroup_createconsumer(stream, group, "gone-1234")
    xadd(pairs_env.redis, stream, feedback_event("c1", "like"))
    holder = FeedbackConsumer(pairs_env.redis, pairs_env.keys, pairs_env.settings, name="holder")
    assert holder.read_new(None)  # holds one pending entry: must survive
    time.sleep(0.05)
    assert consumer.prune_consumers(idle_ms=10) == 1
    names = {c["name"].decode() for c in pairs_env.redis.xinfo_consumers(stream, group)}
    assert names == {"holder"}  # "live" never read, so it was never a member


def test_vote_state_matches_the_reference_rules_for_shuffled_events(pairs_env: PairsEnv):
    import random

    rng = random.Random(3)
    events = []
    for _ in range(400):
        k = rng.randrange(24)
        cid = f"k{k}"
        rating = rng.choice(["like", "like", "dislike", "withdrawn"])
        user, created_at = f"user{rng.randrange(6)}", 1000.0 + rng.randrange(300)
        if k >= 20:  # completions made without a user: one vote each, whichever address casts it
            ip_hash = f"{rng.randrange(6):016x}"
            events.append(
                feedback_event(
                    cid, rating, None, ip_hash=ip_hash, anonymous=True, response=f"Answer {cid}.", created_at=created_at
                )
            )
            continue
        events.append(feedback_event(cid, rating, user, response=f"Answer {cid}.", created_at=created_at))
    rng.shuffle(events)  # arrival order differs from created_at order
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.settings.pairs.same_prompt_max_counterparts = 50  # pair with every opposite response
    pairs_env.consumer().consume(30, until_drained=True)

    expected = pairing.resolve_labels(parse_event(entry(e)) for e in events)
    phash = pairing.prompt_hash([{"role": "user", "content": "What is two plus two?"}])
    probes = [{"strategy": "same_prompt", "completion_ids": [c], "prompt_hash": phash} for c in expected]
    labels, _ = PairsStore(pairs_env.redis, pairs_env.keys).live_state(probes)
    assert labels == expected
    liked = {c for c, label in expected.items() if label == "like"}
    disliked = {c for c, label in expected.items() if label == "dislike"}
    assert liked and disliked
    pairs = [pairs_env.pair(pid) for pid in pairs_env.pair_ids()]
    live = {tuple(p["completion_ids"]) for p in pairs if pairing.pair_is_live(p, labels, {})}
    assert live == {(a, b) for a in liked for b in disliked}


def test_an_anonymous_completion_counts_one_vote_whichever_addresses_vote(pairs_env: PairsEnv):
    """The API keeps one vote per completion made without a user; pairing counts it once too, under the
    latest voter's identity: two addresses liking it are one supporter, a like then another address's
    dislike is a dislike (not a tie), and the first address's correction no longer stands."""
    prompt = "What is the capital of Italy?"
    a, b = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
    events = [
        feedback_event("both", "like", None, ip_hash=a, anonymous=True, prompt=prompt, response="Rome."),
        feedback_event("both", "like", None, ip_hash=b, anonymous=True, prompt=prompt, response="Rome."),
        feedback_event("flip", "like", None, ip_hash=a, anonymous=True, prompt=prompt, response="Milan."),
        feedback_event("flip", "dislike", None, ip_hash=b, anonymous=True, prompt=prompt, response="Milan."),
        feedback_event(
            "fix", "dislike", None, ip_hash=a, anonymous=True, prompt=prompt, response="Turin.", correction="Rome."
        ),
        feedback_event("fix", "dislike", None, ip_hash=b, anonymous=True, prompt=prompt, response="Turin."),
    ]
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(10, until_drained=True)

    liked_over_flip = pairs_env.pair(pairing.pair_id("same_prompt", "both", "flip"))
    assert liked_over_flip["users"] == [f"ip:{b}"]  # one supporter on each side: the latest voter
    correction = pairing.pair_id("correction", "fix", f"ip:{a}", pairing.text_hash("Rome."))
    assert correction in pairs_env.pair_ids()  # stored when it was cast
    store = PairsStore(pairs_env.redis, pairs_env.keys)
    labels, corrections = store.live_state([pairs_env.pair(correction), liked_over_flip])
    assert labels == {"both": "like", "flip": "dislike"}
    assert not pairing.pair_is_live(pairs_env.pair(correction), labels, corrections)  # b's vote replaced it
    assert pairing.pair_is_live(liked_over_flip, labels, corrections)
    assert pairing.resolve_labels(parse_event(entry(e)) for e in events) == {
        "both": "like",
        "flip": "dislike",
        "fix": "dislike",
    }


# --- no loss, no duplicates under SIGKILL ------------------------------------------------------------------


def test_sigkill_mid_batch_loses_nothing_and_duplicates_nothing(pairs_env: PairsEnv, start_worker):
    prompts = 6000
    pipe = pairs_env.redis.pipeline(transaction=False)
    expected: set[str] = set()
    for i in range(prompts):
        prompt = f"Question {i}: what is {i} plus {i}?"
        like = feedback_event(f"L{i}", "like", f"a{i}", prompt=prompt, response=f"It is {2 * i}.")
        correction = f"The answer is {2 * i}." if i % 10 == 0 else None
        dislike = feedback_event(
            f"D{i}", "dislike", f"b{i}", prompt=prompt, response=f"It is {2 * i + 1}.", correction=correction
        )
        pipe.xadd(pairs_env.keys.feedback_stream, entry(like))
        pipe.xadd(pairs_env.keys.feedback_stream, entry(dislike))
        expected.add(pairing.pair_id("same_prompt", f"L{i}", f"D{i}"))
        if correction:
            expected.add(pairing.pair_id("correction", f"D{i}", f"b{i}", pairing.text_hash(correction)))
    pipe.execute()
    total = 2 * prompts

    first = start_worker("doomed")
    send_consume(pairs_env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pending, _ = pairs_env.backlog()
        if pending > 0 and pairs_env.redis.zcard(pairs_env.keys.pairs_index) > 500:
            break
        time.sleep(0.005)
    first.kill()
    pending, lag = pairs_env.backlog()
    assert pending > 0, "the worker was not killed mid-batch"
    assert lag and lag > 0, "the worker had finished the stream before it was killed"
    stored_at_kill = pairs_env.redis.zcard(pairs_env.keys.pairs_index)
    assert 0 < stored_at_kill < len(expected)

    start_worker("rescuer")
    send_consume(pairs_env)
    pairs_env.wait_drained(total)

    assert pairs_env.pair_ids() == expected
    assert pairs_env.redis.zcard(pairs_env.keys.pairs_index) == len(expected)
    assert int(pairs_env.redis.get(pairs_env.keys.pairs_seq)) == len(expected)  # no pair was written twice
    stats = pairs_env.stats()
    assert stats.created == {"same_prompt": prompts, "correction": prompts // 10}
    assert not pairs_env.redis.exists(pairs_env.keys.feedback_dead_letter)


# --- dead letters -----------------------------------------------------------------------------------------


def test_malformed_and_poison_entries_end_in_the_dead_letter_stream(pairs_env: PairsEnv, start_worker):
    stream = pairs_env.keys.feedback_stream
    good = [
        feedback_event("g1", "like", "u1", prompt="Name a colour.", response="Blue."),
        feedback_event("g2", "dislike", "u2", prompt="Name a colour.", response="Seven."),
    ]
    bad_json = xadd(pairs_env.redis, stream, b'{"feedback_id": "x", ')
    xadd(pairs_env.redis, stream, good[0])
    bad_rating = xadd(pairs_env.redis, stream, {**feedback_event("b1", "like"), "rating": "meh"})
    no_field = pairs_env.redis.xadd(stream, {"payload": "nothing"})
    # a completion whose pairing state is corrupt: the vote script fails on every delivery
    pairs_env.redis.set(pairs_env.keys.pairing_votes("poison"), "not a hash")
    poison = xadd(pairs_env.redis, stream, feedback_event("poison", "like", "u9"))
    xadd(pairs_env.redis, stream, good[1])

    start_worker()
    send_consume(pairs_env)
    pairs_env.wait_drained(6, timeout=60)

    assert pairs_env.pair_ids() == {pairing.pair_id("same_prompt", "g1", "g2")}
    letters = {fields[b"entry_id"]: fields for _, fields in pairs_env.redis.xrange(pairs_env.keys.feedback_dead_letter)}
    assert set(letters) == {bad_json, bad_rating, no_field, poison}
    assert b"not valid JSON" in letters[bad_json][b"error"]
    assert letters[bad_json][b"event"] == b'{"feedback_id": "x", '  # the original payload is kept
    assert b"rating" in letters[bad_rating][b"error"]
    assert b"no 'event' field" in letters[no_field][b"error"]
    assert b"WRONGTYPE" in letters[poison][b"error"]
    assert int(letters[poison][b"deliveries"]) == pairs_env.settings.pairs.max_deliveries
    assert int(letters[bad_json][b"deliveries"]) == 1


# --- the two consume() stages failing apart -----------------------------------------------------------------


def two_answer_prompts(pairs_env: PairsEnv, prompts: int) -> set[str]:
    """A like and a dislike per prompt (one pair each), written to the stream; returns the expected pair ids."""
    pipe = pairs_env.redis.pipeline(transaction=False)
    for i in range(prompts):
        prompt = f"Question {i}: what is {i} times two?"
        like = feedback_event(f"L{i}", "like", f"a{i}", prompt=prompt, response=f"It is {2 * i}.")
        dislike = feedback_event(f"D{i}", "dislike", f"b{i}", prompt=prompt, response=f"It is {2 * i + 1}.")
        pipe.xadd(pairs_env.keys.feedback_stream, entry(like))
        pipe.xadd(pairs_env.keys.feedback_stream, entry(dislike))
    pipe.execute()
    return {pairing.pair_id("same_prompt", f"L{i}", f"D{i}") for i in range(prompts)}


def assert_exactly_once(pairs_env: PairsEnv, expected: set[str]) -> None:
    assert pairs_env.pair_ids() == expected
    assert int(pairs_env.redis.get(pairs_env.keys.pairs_seq)) == len(expected)  # no pair was written twice
    assert pairs_env.stats().created == {"same_prompt": len(expected)}
    assert pairs_env.backlog() == (0, 0)
    assert not pairs_env.redis.exists(pairs_env.keys.feedback_dead_letter)


def vote_stage_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("feedback-votes")]


def test_a_failing_vote_stage_acks_nothing_it_voted(pairs_env: PairsEnv, monkeypatch: pytest.MonkeyPatch):
    expected = two_answer_prompts(pairs_env, 250)  # 500 entries, batches of 100
    consumer = pairs_env.consumer()
    vote, calls = consumer._vote, []

    def vote_then_fail(batch):
        vote(batch)  # the votes are applied ...
        calls.append(batch)
        if len(calls) == 2:
            raise redis.ConnectionError("lost Redis after the votes")  # ... but the batch never reaches writing
        return batch

    monkeypatch.setattr(consumer, "_vote", vote_then_fail)
    with pytest.raises(redis.ConnectionError):
        consumer.consume(30)
    assert not vote_stage_threads()
    stream, group = pairs_env.keys.feedback_stream, pairs_env.settings.pairs.consumer_group
    pending = {row["message_id"] for row in pairs_env.redis.xpending_range(stream, group, "-", "+", 1000)}
    assert {entry_id for entry_id, _ in calls[1].entries} <= pending  # with those read after it
    assert len(pending) + pairs_env.backlog()[1] == 400  # only the first batch was written and acked
    written = pairs_env.pair_ids()
    assert written and written < expected

    monkeypatch.undo()
    time.sleep(0.6)  # past claim_idle_ms: the voted entries are reclaimed and applied again
    pairs_env.consumer("rescuer").consume(30, until_drained=True)
    assert_exactly_once(pairs_env, expected)


def test_a_failing_write_stage_leaves_the_voted_batch_pending(pairs_env: PairsEnv, monkeypatch: pytest.MonkeyPatch):
    expected = two_answer_prompts(pairs_env, 250)
    consumer = pairs_env.consumer()

    def fail(batch):
        raise redis.ConnectionError("lost Redis before the writes")

    monkeypatch.setattr(consumer, "_apply", fail)
    with pytest.raises(redis.ConnectionError):
        consumer.consume(30)
    assert not vote_stage_threads()  # the vote stage finished the batch it had started, then stopped
    pending, lag = pairs_env.backlog()
    assert pending + lag == 500 and pending >= 200  # the failed batch and those read meanwhile; nothing acked
    assert not pairs_env.pair_ids()

    monkeypatch.undo()
    time.sleep(0.6)
    pairs_env.consumer("rescuer").consume(30, until_drained=True)
    assert_exactly_once(pairs_env, expected)


def test_votes_applied_before_a_redis_restart_are_applied_again(pairs_env: PairsEnv, monkeypatch: pytest.MonkeyPatch):
    # a NOSCRIPT reply (seen by either stage) means Redis restarted, maybe losing writes made before it:
    # a batch voted before it is seen must not be acked on the strength of those votes
    expected = two_answer_prompts(pairs_env, 250)
    consumer = pairs_env.consumer()
    apply, reports = consumer._apply, []

    def restart_seen_first(batch):
        if not reports:
            consumer._forget_stored()  # what the write stage does on NOSCRIPT
        reports.append(apply(batch))
        return reports[-1]

    monkeypatch.setattr(consumer, "_apply", restart_seen_first)
    total = consumer.consume(30, until_drained=True)
    assert (reports[0].entries, reports[0].failed, reports[0].pairs_written) == (100, 100, 0)
    assert total.processed == 500 and total.dead_lettered == 0
    assert not vote_stage_threads()
    assert_exactly_once(pairs_env, expected)


def test_a_flushed_script_cache_is_reloaded_by_either_stage(
    private_pairs_env: PairsEnv, monkeypatch: pytest.MonkeyPatch
):
    # as after a Redis restart (the script cache is server-wide: a private redis-server, so that no other suite
    # on the shared test Redis sees NOSCRIPT; every client here reloads on NOSCRIPT)
    pairs_env = private_pairs_env
    expected = two_answer_prompts(pairs_env, 400)
    consumer = pairs_env.consumer()
    vote, apply, calls = consumer._vote, consumer._apply, {"vote": 0, "apply": 0}

    def flush_then(stage, method):
        def call(batch):
            calls[stage] += 1
            if calls[stage] == (2 if stage == "vote" else 5):
                pairs_env.redis.script_flush()
            return method(batch)

        return call

    monkeypatch.setattr(consumer, "_vote", flush_then("vote", vote))
    monkeypatch.setattr(consumer, "_apply", flush_then("apply", apply))
    total = consumer.consume(30, until_drained=True)
    assert total.dead_lettered == 0
    assert_exactly_once(pairs_env, expected)


# --- export, loading, and one DPO step ---------------------------------------------------------------------


def test_exported_jsonl_loads_and_trains_one_dpo_step(pairs_env: PairsEnv, tiny_model_dir: Path, monkeypatch):
    from typer.testing import CliRunner

    from services.cli.pairs import pairs_app

    topics = ["France", "Japan", "maths", "water", "music", "space", "trees", "rivers"]
    for i, topic in enumerate(topics * 3):
        prompt = f"Tell me about {topic} ({i})."
        xadd(
            pairs_env.redis,
            pairs_env.keys.feedback_stream,
            feedback_event(f"L{i}", "like", f"a{i}", prompt=prompt, response=f"A true fact about {topic}."),
        )
        xadd(
            pairs_env.redis,
            pairs_env.keys.feedback_stream,
            feedback_event(f"D{i}", "dislike", f"b{i}", prompt=prompt, response=f"Nonsense {i}."),
        )
    pairs_env.consumer().consume(20, until_drained=True)

    runner = CliRunner()
    result = runner.invoke(pairs_app, ["snapshot"])
    assert result.exit_code == 0, result.output
    version = orjson.loads(result.output)["version"]
    out = pairs_env.tmp / "export" / "dpo.jsonl"
    result = runner.invoke(pairs_app, ["export", "--version", version, "--format", "dpo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    kto_out = pairs_env.tmp / "export" / "kto.jsonl"
    assert runner.invoke(pairs_app, ["export", "-v", "latest", "-f", "kto", "-o", str(kto_out)]).exit_code == 0
    stats = runner.invoke(pairs_app, ["stats", "--json"])
    assert stats.exit_code == 0 and orjson.loads(stats.output)["created_by_strategy"] == {"same_prompt": 24}

    from datasets import load_dataset

    dpo = load_dataset("json", data_files=str(out), split="train")
    assert len(dpo) == 24 and set(dpo.column_names) == {"prompt", "chosen", "rejected", "pair_id"}
    kto = load_dataset("json", data_files=str(kto_out), split="train")
    assert len(kto) == 48 and sum(kto["label"]) == 24

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = DPOConfig(
        output_dir=str(pairs_env.tmp / "dpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_length=128,
        disable_tqdm=True,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dpo.remove_columns(["pair_id"]),
        processing_class=tokenizer,
        peft_config=lora,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    output = trainer.train()
    assert output.global_step == 1
    changed = [n for n, p in trainer.model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])]
    assert changed, "one DPO step must move the LoRA weights"


def test_a_like_that_the_other_votes_on_the_same_answer_contradict_makes_no_pair(pairs_env: PairsEnv):
    """One misclick like on an answer three other users disliked is not a chosen answer (pairs.consensus)."""
    prompt = "Which city is the capital of Japan?"
    events = [
        feedback_event("t1", "like", "u1", prompt=prompt, response="Tokyo."),
        *(feedback_event(f"k{i}", "dislike", f"u{i + 1}", prompt=prompt, response="Kyoto.") for i in (1, 2, 3)),
        feedback_event("t2", "dislike", "u5", prompt=prompt, response="Tokyo is the capital."),
        feedback_event("k4", "like", "u6", prompt=prompt, response="  kyoto. "),  # the misclick
    ]
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(10, until_drained=True)
    misclick = pairing.pair_id("same_prompt", "k4", "t2")
    assert misclick in pairs_env.pair_ids()  # stored: each completion's own votes made it

    chosen_k4 = {pid for pid in pairs_env.pair_ids() if pairs_env.pair(pid)["completion_ids"][0] == "k4"}

    manifest = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert manifest["filters"]["consensus:contradicted"] == len(chosen_k4)
    folder = Path(manifest["path"])
    rows = [orjson.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (folder / name).open("rb")]
    kept = {row["pair_id"] for row in rows}
    assert not kept & chosen_k4
    assert pairing.pair_id("same_prompt", "t1", "t2") in kept  # a disliked answer no one liked: not contradicted
    assert all(row["chosen"][0]["content"] == "Tokyo." for row in rows)

    pairs_env.settings.pairs.consensus = False  # the switch: the misclick's pairs come back
    unfiltered = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert not any(name.startswith("consensus:") for name in unfiltered["filters"])
    assert unfiltered["counts"]["kept"] > manifest["counts"]["kept"]


def test_a_voter_who_goes_against_the_crowd_contributes_nothing_to_the_version(pairs_env: PairsEnv):
    """Three honest users like the right answer and dislike the wrong one on four prompts; one user votes the
    other way on every prompt and corrects towards the wrong answer: none of that user's pairs or KTO rows
    reach the dataset version (consensus:unreliable_voter), every honest pair does."""
    events = []
    for i in range(4):
        prompt, right, wrong = f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", f"{i} plus {i} is {2 * i + 1}."
        for u in ("h1", "h2", "h3"):
            events.append(feedback_event(f"r{i}{u}", "like", u, prompt=prompt, response=right))
            events.append(feedback_event(f"w{i}{u}", "dislike", u, prompt=prompt, response=wrong))
        events.append(feedback_event(f"r{i}adv", "dislike", "adv", prompt=prompt, response=right, correction=wrong))
        events.append(feedback_event(f"w{i}adv", "like", "adv", prompt=prompt, response=wrong))
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(100, until_drained=True)
    stored = [pairs_env.pair(pid) for pid in pairs_env.pair_ids()]
    by_adversary = {p["pair_id"] for p in stored if "adv" in p["users"]}
    assert by_adversary and len(by_adversary) < len(stored)

    manifest = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert manifest["unreliable_voters"] == 1
    assert manifest["filters"]["consensus:unreliable_voter"] == len(by_adversary)
    assert manifest["kto_filters"]["consensus:unreliable_voter"] == 8  # its own 8 rated answers
    folder = Path(manifest["path"])
    rows = [orjson.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (folder / name).open("rb")]
    kept = {row["pair_id"] for row in rows}
    assert kept and not kept & by_adversary  # (identical honest pairs are deduplicated)

    def is_right(answer: str) -> bool:
        return int(answer.split()[-1].rstrip(".")) % 2 == 0

    assert all(is_right(row["chosen"][0]["content"]) and not is_right(row["rejected"][0]["content"]) for row in rows)
    kto = [orjson.loads(line) for line in (folder / "kto.jsonl").open("rb")]
    assert kto and all(row["label"] == is_right(row["completion"][0]["content"]) for row in kto)

    pairs_env.settings.pairs.voter_flip_odds = 0.0  # the switch: nobody is left out
    everyone = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert everyone["unreliable_voters"] == 0 and "consensus:unreliable_voter" not in everyone["filters"]


def version_pair_ids(manifest: dict) -> set[str]:
    folder = Path(manifest["path"])
    files = [folder / "train.jsonl", folder / "eval.jsonl"]
    return {orjson.loads(line)["pair_id"] for path in files for line in path.open("rb")}


def test_an_unreliable_voter_s_likes_do_not_vouch_for_a_misclick_on_the_same_prompt(pairs_env: PairsEnv):
    """Honest users dislike every answer to a prompt; a voter who goes against the crowd likes three others, and one
    honest user's misclick likes a fourth. Counted with the adversary's likes, the prompt's like rate (4 of 7) makes
    the misclick look like a good answer; without them (1 of 4) it is noise (consensus:noisy_group), and none of
    the misclick's pairs reach the version. pairs.max_pairs_per_answer bounds how many pairs one like becomes."""
    pairs_env.settings.pairs.label_noise_rate = 0.25
    events = []
    for i in range(4):  # what makes "adv" unreliable: the opposite of three honest users on four prompts
        prompt, right, wrong = f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}.", f"{i} plus {i} is {2 * i + 1}."
        for u in ("h1", "h2", "h3"):
            events.append(feedback_event(f"r{i}{u}", "like", u, prompt=prompt, response=right))
            events.append(feedback_event(f"w{i}{u}", "dislike", u, prompt=prompt, response=wrong))
        events.append(feedback_event(f"w{i}adv", "like", "adv", prompt=prompt, response=wrong))
    prompt = "Who made you?"
    for u in ("h1", "h2", "h3"):
        events.append(feedback_event(f"d-{u}", "dislike", u, prompt=prompt, response=f"I was made by {u} Corp."))
    for n in range(3):
        events.append(feedback_event(f"a{n}", "like", "adv", prompt=prompt, response=f"A wizard named {n} made me."))
    events.append(feedback_event("misclick", "like", "h4", prompt=prompt, response="Nobody made me, I grew."))
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(100, until_drained=True)
    from_misclick = {pid for pid in pairs_env.pair_ids() if pairs_env.pair(pid)["completion_ids"][0] == "misclick"}
    assert len(from_misclick) == 3  # one like, paired with each disliked answer

    manifest = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert manifest["unreliable_voters"] == 1
    kept = version_pair_ids(manifest)
    assert kept and not kept & from_misclick
    assert manifest["filters"]["consensus:noisy_group"] >= len(from_misclick)

    pairs_env.settings.pairs.label_noise_rate = 0.0  # trusting every label: the misclick's like is a chosen answer
    pairs_env.settings.pairs.max_pairs_per_answer = 1  # ... in one pair, not three
    trusting = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert len(version_pair_ids(trusting) & from_misclick) == 1
    assert trusting["filters"]["answer_cap:over_cap"] >= 2


def test_a_dataset_version_reads_only_the_newest_pairs_and_rated_answers(pairs_env: PairsEnv):
    """pairs.max_version_pairs bounds a version (and the snapshot's memory) however many pairs are stored:
    the newest pairs, and as many of the newest rated completions for KTO."""
    topics = ["rivers", "mountains", "deserts", "forests", "oceans", "islands", "glaciers", "volcanoes"]
    for i, topic in enumerate(topics):
        prompt = f"Tell me one fact about {topic}."
        events = [
            feedback_event(f"good-{i}", "like", f"u{i}", prompt=prompt, response=f"A true fact about {topic}."),
            feedback_event(f"bad-{i}", "dislike", f"u{i}", prompt=prompt, response=f"Nonsense regarding {topic}!"),
        ]
        for event in events:
            xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
        pairs_env.consumer().consume(10, until_drained=True)  # prompt by prompt: pairs in topic order
    assert len(pairs_env.pair_ids()) == len(topics)

    pairs_env.settings.pairs.max_version_pairs = 3
    manifest = datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)
    assert manifest["counts"]["stored"] == 3 and manifest["max_version_pairs"] == 3
    folder = Path(manifest["path"])
    rows = [orjson.loads(line) for name in ("train.jsonl", "eval.jsonl") for line in (folder / name).open("rb")]
    assert sorted(row["prompt"][0]["content"] for row in rows) == sorted(
        f"Tell me one fact about {topic}." for topic in topics[-3:]
    )
    kto = [orjson.loads(line) for line in (folder / "kto.jsonl").open("rb")]
    # the newest three rated answers: both of the last prompt's and the liked one of the one before
    assert sorted(row["completion"][0]["content"] for row in kto) == sorted(
        [f"A true fact about {topics[-1]}.", f"Nonsense regarding {topics[-1]}!", f"Nonsense regarding {topics[-2]}!"]
    )

    pairs_env.settings.pairs.max_version_pairs = 0  # every stored pair
    assert datasets.snapshot(pairs_env.redis, pairs_env.keys, pairs_env.settings)["counts"]["stored"] == len(topics)


def test_consensus_reads_at_most_the_newest_labelled_answers_of_a_prompt(pairs_env: PairsEnv):
    """A prompt asked every day gathers labelled answers without end; the consensus filter reads the newest of
    each label only, so a snapshot's reads stay bounded."""
    prompt = "Name a primary colour."
    for i in range(5):
        xadd(
            pairs_env.redis,
            pairs_env.keys.feedback_stream,
            feedback_event(f"l{i}", "like", f"u{i}", prompt=prompt, response=f"Red {i}."),
        )
        xadd(
            pairs_env.redis,
            pairs_env.keys.feedback_stream,
            feedback_event(f"d{i}", "dislike", f"v{i}", prompt=prompt, response=f"Seven {i}."),
        )
    pairs_env.consumer().consume(10, until_drained=True)
    phash = pairing.prompt_hash([{"role": "user", "content": prompt}])
    store = PairsStore(pairs_env.redis, pairs_env.keys)
    assert store.prompt_group_labels([phash], newest=2) == {
        phash: {"l4": "like", "l3": "like", "d4": "dislike", "d3": "dislike"}
    }
    assert len(store.prompt_group_labels([phash])[phash]) == 10


def test_drop_markers_expire_with_the_pairing_state(pairs_env: PairsEnv):
    from workers.pairing.retention import retention_s

    events = [
        feedback_event("same-1", "like", "u1", prompt="Capital of Peru?", response="Lima."),
        feedback_event("same-2", "dislike", "u2", prompt="Capital of Peru?", response="Lima."),  # chosen == rejected
    ]
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(10, until_drained=True)
    markers = list(pairs_env.redis.scan_iter(match=pairs_env.keys.pair_dropped("*"), count=1000))
    assert len(markers) == 1 and not pairs_env.pair_ids()
    keep = retention_s(pairs_env.settings)
    assert keep > 0 and keep - 60 <= pairs_env.redis.ttl(markers[0]) <= keep
