"""Generated pairs (weaker_answer, stronger_answer with its judge) through real Redis and a real HTTP
OpenAI-compatible endpoint.

The endpoint here stands in for a third-party teacher/judge model (any OpenAI-compatible URL is
supported); the test against the served base model lives in test_pairs_api.py (it needs the live API).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.integration.pairing.test_pairs_worker import PairsEnv, pairs_env  # noqa: F401 - fixture
from tests.support.feedback_events import feedback_event, xadd
from workers.pairing import rules as pairing
from workers.pairing.generation import generate_pairs
from workers.pairing.quality import TokenCounter


class StandInModel(BaseHTTPRequestHandler):
    """/v1/chat/completions: 'weak' writes a careless answer, 'teacher' a good one; as a judge it prefers
    an answer holding GOLD, else one holding TEACHER. A prompt holding FAIL gets a 500."""

    requests: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        StandInModel.requests.append(body)
        messages = body["messages"]
        text = messages[-1]["content"]
        if "FAIL" in text:
            self.send_response(500)
            self.end_headers()
            return
        if "SLOW" in text:
            time.sleep(1.0)
        if messages[0]["content"] == pairing.JUDGE_RUBRIC:
            a = text.split("Answer A:\n", 1)[1].split("\n\nAnswer B:", 1)[0]
            b = text.split("Answer B:\n", 1)[1]
            for marker in ("GOLD", "TEACHER"):
                if (marker in a) != (marker in b):
                    content = "A" if marker in a else "B"
                    break
        elif body["model"] == "weak":
            content = f"weak guess at {body['temperature']}"
        else:
            content = f"TEACHER: a careful answer to '{text}'"
        reply = {
            "id": "chatcmpl-standin",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stand_in_url() -> Iterator[str]:
    StandInModel.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_generated_pairs_with_judge_and_retries(pairs_env: PairsEnv, stand_in_url: str, tmp_path: Path):  # noqa: F811
    cfg = pairs_env.settings.pairs
    cfg.strategies = ["same_prompt", "correction", "weaker_answer", "stronger_answer"]
    cfg.weaker_source, cfg.weaker_model, cfg.weaker_temperature = stand_in_url, "weak", 1.7
    cfg.teacher_url, cfg.teacher_model, cfg.judge = stand_in_url, "teacher", True
    cfg.generation_max_attempts = 2
    stream = pairs_env.keys.feedback_stream
    for event in [
        feedback_event("liked", "like", "u1", prompt="Name a planet.", response="Mars."),
        feedback_event("disliked", "dislike", "u2", prompt="Name a river.", response="A fish."),
        feedback_event("gold", "dislike", "u3", prompt="Name a metal.", response="GOLD, obviously."),
        feedback_event("flaky", "dislike", "u4", prompt="FAIL here", response="Hm."),
        feedback_event("paired", "like", "u5", prompt="Name a tree.", response="Oak."),
        feedback_event("paired-2", "dislike", "u6", prompt="Name a tree.", response="Rock."),
    ]:
        xadd(pairs_env.redis, stream, event)
    pairs_env.consumer().consume(10, until_drained=True)
    weaker_key = pairs_env.keys.pairing_candidates("weaker_answer")
    stronger_key = pairs_env.keys.pairing_candidates("stronger_answer")
    assert {c.decode() for c in pairs_env.redis.zrange(weaker_key, 0, -1)} == {"liked", "paired"}
    assert {c.decode() for c in pairs_env.redis.zrange(stronger_key, 0, -1)} == {"disliked", "gold", "flaky"}

    tokens = TokenCounter(None)
    report = generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)
    assert report["weaker_answer"] == {
        "candidates": 2,
        "written": 1,
        "dropped": 0,
        "failed": 0,
        "ineligible": 1,
        "deferred": 0,
    }
    assert report["stronger_answer"] == {
        "candidates": 3,
        "written": 1,
        "dropped": 1,
        "failed": 1,
        "ineligible": 0,
        "deferred": 0,
    }

    weaker = pairs_env.pair(pairing.pair_id("weaker_answer", "liked"))
    assert weaker["chosen"][0]["content"] == "Mars." and weaker["rejected"][0]["content"] == "weak guess at 1.7"
    assert weaker["generated_by"] == "weak" and weaker["users"] == ["u1"]
    stronger = pairs_env.pair(pairing.pair_id("stronger_answer", "disliked"))
    assert stronger["chosen"][0]["content"].startswith("TEACHER") and stronger["rejected"][0]["content"] == "A fish."
    assert stronger["judged"] is True
    assert pairs_env.redis.get(pairs_env.keys.pair_dropped(pairing.pair_id("stronger_answer", "gold"))) == (
        b"drop:judge:not_better"
    )
    generation_calls = [r for r in StandInModel.requests if r["messages"][0]["content"] != pairing.JUDGE_RUBRIC]
    assert {r["model"] for r in generation_calls} == {"weak", "teacher"}

    # the failed candidate stays for another round, then is given up after generation_max_attempts
    assert {c.decode() for c in pairs_env.redis.zrange(stronger_key, 0, -1)} == {"flaky"}
    second = generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)
    assert second["stronger_answer"]["failed"] == 1
    assert pairs_env.redis.zcard(stronger_key) == 0 and pairs_env.redis.zcard(weaker_key) == 0
    stats = pairs_env.stats()
    assert stats.created == {"weaker_answer": 1, "stronger_answer": 1, "same_prompt": 1}
    assert stats.dropped == {("judge", "not_better"): 1, ("generation", "failed"): 1}

    # nothing left: another round generates nothing and writes nothing
    calls = len(StandInModel.requests)
    third = generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)
    assert third["weaker_answer"]["candidates"] == 0 and len(StandInModel.requests) == calls


def test_a_round_shares_its_batch_among_the_users_who_rated_the_candidates(
    pairs_env: PairsEnv,  # noqa: F811
    stand_in_url: str,
):
    """One user who likes many answers first must not take a whole round while others' likes wait behind them."""
    cfg = pairs_env.settings.pairs
    cfg.strategies = ["same_prompt", "weaker_answer"]
    cfg.weaker_source, cfg.weaker_model = stand_in_url, "weak"
    cfg.generation_batch = 4
    events = [feedback_event(f"heavy-{i}", "like", "heavy", prompt=f"Heavy question {i}", response="Yes.")
              for i in range(10)]  # fmt: skip
    events += [feedback_event(f"light-{i}", "like", f"light-{i}", prompt=f"Light question {i}", response="Yes.")
               for i in range(3)]  # fmt: skip
    for event in events:
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, event)
    pairs_env.consumer().consume(20, until_drained=True)
    candidates = pairs_env.keys.pairing_candidates("weaker_answer")
    assert pairs_env.redis.zcard(candidates) == 13
    oldest = [c.decode() for c in pairs_env.redis.zrange(candidates, 0, 3)]
    assert all(c.startswith("heavy-") for c in oldest)  # by age alone the round would be the heavy user's

    tokens = TokenCounter(None)
    first = generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)["weaker_answer"]
    assert first == {"candidates": 13, "written": 4, "dropped": 0, "failed": 0, "ineligible": 0, "deferred": 9}
    asked = sorted(r["messages"][-1]["content"] for r in StandInModel.requests)
    assert asked == ["Heavy question 0", "Light question 0", "Light question 1", "Light question 2"]

    # the heavy user's other likes are kept, not lost: later rounds take them, oldest first
    rounds = [generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)
              for _ in range(3)]  # fmt: skip
    assert [r["weaker_answer"]["written"] for r in rounds] == [4, 4, 1]
    assert pairs_env.redis.zcard(candidates) == 0
    assert pairs_env.stats().created == {"weaker_answer": 13}
    later = sorted(r["messages"][-1]["content"] for r in StandInModel.requests[4:])
    assert later == [f"Heavy question {i}" for i in range(1, 10)]


def test_a_round_that_overlaps_a_running_one_skips_and_asks_nothing(
    pairs_env: PairsEnv,  # noqa: F811
    stand_in_url: str,
):
    """Beat starts generation rounds every few seconds; one still waiting on a slow engine must not be joined by a
    second that takes the same candidates and the worker's other slot."""
    cfg = pairs_env.settings.pairs
    cfg.strategies = ["same_prompt", "weaker_answer"]
    cfg.weaker_source, cfg.weaker_model = stand_in_url, "weak"
    for i in range(3):
        xadd(pairs_env.redis, pairs_env.keys.feedback_stream, feedback_event(
            f"liked-{i}", "like", f"u{i}", prompt=f"SLOW question {i}", response=f"Answer {i}."
        ))  # fmt: skip
    pairs_env.consumer().consume(10, until_drained=True)
    candidates = pairs_env.keys.pairing_candidates("weaker_answer")
    assert pairs_env.redis.zcard(candidates) == 3

    lock = pairs_env.keys.pairing_generation_lock("weaker_answer")
    tokens = TokenCounter(None)
    first: dict = {}
    running = threading.Thread(
        target=lambda: first.update(generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings,
                                                   token_counter=tokens))
    )  # fmt: skip
    running.start()
    deadline = time.monotonic() + 10
    while not pairs_env.redis.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pairs_env.redis.exists(lock), "the first round never took the lock"
    overlapping = generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)
    running.join(timeout=60)

    assert overlapping["weaker_answer"] == {"skipped": "another round is running"}
    assert first["weaker_answer"]["written"] == 3
    asked = sorted(r["messages"][-1]["content"] for r in StandInModel.requests)
    assert asked == [f"SLOW question {i}" for i in range(3)]  # each candidate generated once
    assert not pairs_env.redis.exists(lock) and pairs_env.redis.zcard(candidates) == 0
    # the lock went with the round: the next one runs (and finds nothing left)
    assert (
        generate_pairs(pairs_env.redis, pairs_env.keys, pairs_env.settings, token_counter=tokens)["weaker_answer"][
            "candidates"
        ]
        == 0
    )
