"""Pairs from the real API: feedback posted over HTTP becomes pairs, and weaker answers come from the
real engine's base model (`feedloop-base`). Uses the session's live API server (tests/conftest.py)."""

from __future__ import annotations

import uuid

import httpx
import orjson

from tests.conftest import LiveApi
from workers.pairing import rules as pairing
from workers.pairing.consumer import FeedbackConsumer
from workers.pairing.generation import generate_pairs
from workers.pairing.quality import TokenCounter


def chat(openai_client, live_api: LiveApi, prompt: str, seed: int, user: str) -> dict:
    reply = openai_client.chat.completions.create(
        model="feedloop",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=12,
        temperature=1.0,
        seed=seed,
        user=user,
    )
    assert live_api.flush_interactions(reply.id) is not None
    return reply.model_extra["feedback"] | {"text": reply.choices[0].message.content}


def vote(live_api: LiveApi, completion: dict, rating: str, user: str, **extra) -> None:
    body = {"completion_id": completion["completion_id"], "token": completion["token"], "rating": rating}
    response = httpx.post(live_api.base_url + "/v1/feedback", json={**body, "user": user, **extra})
    assert response.status_code == 202, response.text


def drain(live_api: LiveApi) -> None:
    consumer = FeedbackConsumer(live_api.redis, live_api.keys, live_api.settings, name=f"test-{uuid.uuid4().hex[:6]}")
    consumer.consume(30, until_drained=True)


def stored_pair(live_api: LiveApi, pid: str) -> dict:
    raw = live_api.redis.get(live_api.keys.pair(pid))
    assert raw is not None, f"pair {pid} was not stored"
    return orjson.loads(raw)


def distinct_answers(openai_client, live_api: LiveApi, prompt: str, user: str) -> tuple[dict, dict]:
    first = chat(openai_client, live_api, prompt, seed=1, user=user)
    for seed in range(2, 12):
        second = chat(openai_client, live_api, prompt, seed=seed, user=user)
        if pairing.normalize_text(second["text"]) != pairing.normalize_text(first["text"]):
            return first, second
    raise AssertionError("the engine gave the same answer for ten seeds")


def test_feedback_posted_through_the_api_becomes_pairs(openai_client, live_api: LiveApi):
    user = f"pairs-{uuid.uuid4().hex[:6]}"
    prompt = f"Name a fruit, {user}."
    good, bad = distinct_answers(openai_client, live_api, prompt, user)
    vote(live_api, good, "like", user)
    vote(live_api, bad, "dislike", user, correction="A banana. Ask me at fruit@example.com")
    drain(live_api)

    same = stored_pair(live_api, pairing.pair_id("same_prompt", good["completion_id"], bad["completion_id"]))
    assert same["prompt"] == [{"role": "user", "content": prompt}]
    assert same["chosen"] == [{"role": "assistant", "content": good["text"]}]
    assert same["rejected"] == [{"role": "assistant", "content": bad["text"]}]
    assert same["users"] == [user] and same["adapter"] is None
    correction = pairing.text_hash("A banana. Ask me at fruit@example.com")
    corrected = stored_pair(live_api, pairing.pair_id("correction", bad["completion_id"], user, correction))
    assert corrected["chosen"][0]["content"] == "A banana. Ask me at [EMAIL]"
    assert corrected["rejected"][0]["content"] == bad["text"]
    group = live_api.settings.pairs.consumer_group
    info = {g["name"].decode(): g for g in live_api.redis.xinfo_groups(live_api.keys.feedback_stream)}
    assert info[group]["pending"] == 0 and info[group]["lag"] == 0


def test_weaker_answer_against_the_real_engine(openai_client, live_api: LiveApi, tiny_model_dir):
    settings = live_api.settings.model_copy(deep=True)
    settings.pairs.api_url = live_api.base_url
    settings.pairs.weaker_source = "base"
    settings.pairs.generation_max_tokens = 16
    settings.pairs.generation_batch = 1000
    # The weaker answer is sampled at high temperature without a seed: the tiny model sometimes ends it at once
    # and the quality filter drops the empty pair (correctly). Try a few liked answers until one is written.
    for attempt in range(4):
        user = f"weak-{uuid.uuid4().hex[:6]}"
        liked = chat(openai_client, live_api, f"Tell me something true, {user}.", seed=3 + attempt, user=user)
        vote(live_api, liked, "like", user)
        drain(live_api)
        candidates = live_api.keys.pairing_candidates("weaker_answer")
        assert live_api.redis.zscore(candidates, liked["completion_id"])
        # Earlier tests on the shared server leave candidates of their own (over a thousand after the Prometheus
        # test): generate only this one, so it is not cut off by generation_batch.
        others = [c for c in live_api.redis.zrange(candidates, 0, -1) if c.decode() != liked["completion_id"]]
        if others:
            live_api.redis.zrem(candidates, *others)
        report = generate_pairs(
            live_api.redis,
            live_api.keys,
            settings,
            strategies=["weaker_answer"],
            token_counter=TokenCounter(str(tiny_model_dir)),
        )
        assert report["weaker_answer"]["failed"] == 0, report
        if live_api.redis.exists(live_api.keys.pair(pairing.pair_id("weaker_answer", liked["completion_id"]))):
            break
        assert report["weaker_answer"]["dropped"] >= 1, report
    pair = stored_pair(live_api, pairing.pair_id("weaker_answer", liked["completion_id"]))
    assert pair["generated_by"] == "feedloop-base"
    assert pair["chosen"] == [{"role": "assistant", "content": liked["text"]}]
    weaker = pair["rejected"][0]["content"]
    assert weaker.strip() and weaker != liked["text"]
    assert not live_api.redis.zscore(live_api.keys.pairing_candidates("weaker_answer"), liked["completion_id"])
