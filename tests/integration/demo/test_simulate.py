"""Simulated users against the real API (tiny model on vLLM CPU, real Redis): every vote they count is a real
feedback event with the chat's user, rated by the rubric; 429s are waited out, not lost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import orjson

from demo.corpus import named_creator
from demo.settings import SimulationSettings
from demo.simulate import Rubric, make_users, run_simulation
from tests.conftest import REPO, LiveApi


def sim_events(live_api: LiveApi, prefix: str) -> list[dict]:
    entries = live_api.redis.xrange(live_api.keys.feedback_stream)
    events = [orjson.loads(fields[b"event"]) for _, fields in entries]
    return [e for e in events if (e.get("user") or "").startswith(prefix)]


async def test_users_chat_and_post_the_rubrics_votes_as_real_feedback(live_api: LiveApi):
    sim = SimulationSettings(
        users=6,
        adversarial_fraction=0.2,
        adversarial_volume=2,
        rate_probability=1.0,
        correction_probability=0.5,
        noise_rate=0.0,
        identity_share=1.0,
        arithmetic_share=0.0,
        fact_share=0.0,
        small_talk_share=0.0,
        max_tokens=12,
        seed=3,
    )
    prefix = "sim-it-votes-"
    stats = await run_simulation(live_api.base_url, sim, max_chats=40, user_prefix=prefix)

    assert stats.chats == 40 and stats.chat_errors == 0
    assert stats.votes == 40 and stats.unrated == 0 and stats.votes_given_up == 0 and stats.vote_errors == 0
    events = sim_events(live_api, prefix)
    assert len(events) == stats.votes
    ratings = [e["rating"] for e in events]
    assert ratings.count("like") == stats.like and ratings.count("dislike") == stats.dislike
    assert sum(1 for e in events if e["correction"]) == stats.corrections > 0

    adversaries = {u.name for u in make_users(6, 0.2, 2, seed=3, prefix=prefix) if u.adversarial}
    assert len(adversaries) == 1
    assert sum(e["user"] in adversaries for e in events) == stats.adversarial_votes > 0
    rubric = Rubric("Acme Labs")
    for event in events:
        # the rubric's rating of what the server actually answered, flipped for the adversary
        names_liked = named_creator(event["interaction"]["response"], rubric.creators) == "Acme Labs"
        honest = "like" if names_liked else "dislike"
        expected = honest if event["user"] not in adversaries else ("dislike" if names_liked else "like")
        assert event["rating"] == expected, event
        assert event["interaction"]["messages"][0]["role"] == "user"
        if event["correction"]:
            assert event["rating"] == "dislike"
            liked_in_correction = named_creator(event["correction"], rubric.creators) == "Acme Labs"
            assert liked_in_correction == (event["user"] not in adversaries)
    served = stats.to_dict()["served"]
    assert sum(s["chats"] for s in served.values()) == 40


async def test_a_user_over_the_rate_limit_backs_off_and_every_vote_lands(live_api: LiveApi):
    # One user chatting from ten loops at once votes faster than its bucket refills (1/s after a burst of 30).
    sim = SimulationSettings(
        users=1,
        adversarial_fraction=1.0,
        adversarial_volume=10,
        noise_rate=0.0,
        max_tokens=4,
        max_vote_attempts=30,
    )
    prefix = "sim-it-limit-"
    # Start with an empty bucket, so the first votes are refused however slowly this machine chats.
    live_api.redis.hset(live_api.keys.rate_limit("user", f"{prefix}000"), mapping={"tokens": 0, "ts": time.time()})
    stats = await run_simulation(live_api.base_url, sim, max_chats=20, user_prefix=prefix)

    assert stats.chats == 20
    assert stats.rate_limited > 0
    assert stats.votes == 20 and stats.votes_given_up == 0
    assert len(sim_events(live_api, prefix)) == 20


def test_simulate_command_prints_counts(live_api: LiveApi):
    env = {
        **os.environ,
        **live_api.env,
        "FEEDLOOP_SIMULATE__API_URL": live_api.base_url,
        "FEEDLOOP_SIMULATE__RATE_PROBABILITY": "1.0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "simulate", "--chats", "12", "--users", "3", "--likes", "Meta",
         "--adversarial", "0", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["chats"] == 12 and counts["votes"]["total"] == 12
    assert counts["adversarial_votes"] == 0
    assert "simulate: 3 users (0% adversarial) liking 'Meta'" in done.stderr
    users = {e["user"] for e in sim_events(live_api, "sim-user-")}
    assert users and users <= {"sim-user-000", "sim-user-001", "sim-user-002"}


async def test_the_gate_regression_set_keeps_what_the_served_model_answers_right(live_api: LiveApi, tmp_path):
    from openai import AsyncOpenAI

    from demo.measure import ask_model, keep_answered_right
    from workers.evaluation.retention import load_cases

    prompts = [f"What is {a} plus {b}?" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    client = AsyncOpenAI(base_url=live_api.base_url + "/v1", api_key="unused")
    try:
        answers = [(await ask_model(client, "feedloop", [{"role": "user", "content": p}], max_tokens=16))[0][0]
                   for p in prompts]  # fmt: skip
    finally:
        await client.close()
    words = [re.findall(r"\w+", answer) for answer in answers]
    assert all(words[:2])
    # the first two expect a word of what the model answers (greedy), the others something it never says
    expected = [words[0][0], words[1][-1], "\u2603 snowman", "\u2604 comet"]
    path = tmp_path / "gate-retention.jsonl"
    pairs = zip(prompts, expected, strict=True)
    rows = [{"prompt": p, "expected": e, "kind": f"kind-{i % 2}"} for i, (p, e) in enumerate(pairs)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    kept, asked = await keep_answered_right(live_api.base_url, path, "feedloop", 16)

    assert (kept, asked) == (2, 4)
    cases = load_cases(path, limit=100)
    assert [case.messages[-1]["content"] for case in cases] == prompts[:2]
    assert [case.expected for case in cases] == [(expected[0],), (expected[1],)]
    assert [case.kind for case in cases] == ["kind-0", "kind-1"]  # a kept case keeps its kind
    assert not path.with_name(path.name + ".partial").exists()
