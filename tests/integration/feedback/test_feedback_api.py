"""Feedback capture through the real API (real engine, real Redis): signed votes, idempotency, errors."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import pytest

from services.feedback.signing import sign
from tests.conftest import ALLOWED_ORIGIN, FEEDBACK_SECRET, LiveApi, redis_state, writes_between


def complete(openai_client, live_api: LiveApi, user: str | None = None) -> dict:
    kwargs = {"user": user} if user else {}
    r = openai_client.chat.completions.create(
        model="feedloop", messages=[{"role": "user", "content": "Tell me a fact."}], max_tokens=4, **kwargs
    )
    assert live_api.flush_interactions(r.id) is not None
    return r.model_extra["feedback"] | {"text": r.choices[0].message.content}


def events_for(live_api: LiveApi, completion_id: str) -> list[dict]:
    entries = live_api.redis.xrange(live_api.keys.feedback_stream)
    events = [orjson.loads(fields[b"event"]) for _, fields in entries]
    return [e for e in events if e["completion_id"] == completion_id]


def post(live_api: LiveApi, body: dict | bytes, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            live_api.base_url + "/v1/feedback",
            content=body,
            headers={"content-type": "application/json"},
            **kw,
        )
    return httpx.post(live_api.base_url + "/v1/feedback", json=body, **kw)


def test_vote_change_and_withdraw(openai_client, live_api: LiveApi):
    fb = complete(openai_client, live_api, user="vote-user")
    cid, token = fb["completion_id"], fb["token"]
    like = {"completion_id": cid, "token": token, "rating": "like", "user": "vote-user"}

    r = post(live_api, like)
    assert r.status_code == 202 and r.json() == {"completion_id": cid, "rating": "like", "status": "recorded"}
    (event,) = events_for(live_api, cid)
    # The record is built from the server's stored interaction, not from the client.
    assert event["interaction"]["response"] == fb["text"]
    assert event["interaction"]["messages"] == [{"role": "user", "content": "Tell me a fact."}]
    assert event["user"] == "vote-user" and event["rating"] == "like"

    assert post(live_api, like).json()["status"] == "unchanged"
    assert len(events_for(live_api, cid)) == 1

    r = post(live_api, {**like, "rating": "dislike", "correction": "Water boils at 100 degrees Celsius."})
    assert r.json()["status"] == "recorded"
    got = httpx.get(f"{live_api.base_url}/v1/feedback/{cid}", params={"user": "vote-user", "token": token}).json()
    assert got["rating"] == "dislike" and got["correction"] == "Water boils at 100 degrees Celsius."
    history = live_api.redis.lrange(live_api.keys.vote_history(cid), 0, -1)
    assert [orjson.loads(h)["rating"] for h in history] == ["like", "dislike"]

    r = httpx.request("DELETE", f"{live_api.base_url}/v1/feedback/{cid}", json={"token": token})
    assert r.status_code == 200 and r.json()["status"] == "withdrawn"
    assert httpx.get(f"{live_api.base_url}/v1/feedback/{cid}", params={"token": token}).json()["rating"] is None
    assert [e["rating"] for e in events_for(live_api, cid)] == ["like", "dislike", "withdrawn"]
    r = httpx.request("DELETE", f"{live_api.base_url}/v1/feedback/{cid}", params={"token": token})
    assert r.json()["status"] == "unchanged"


def test_anonymous_completion_takes_one_vote_whatever_user_is_claimed(openai_client, live_api: LiveApi):
    # One token, one vote: claimed user names do not multiply the votes on a completion made without a user.
    fb = complete(openai_client, live_api)
    base = {"completion_id": fb["completion_id"], "token": fb["token"]}
    assert post(live_api, {**base, "rating": "like", "user": "u1"}).json()["status"] == "recorded"
    assert post(live_api, {**base, "rating": "dislike", "user": "u2"}).json()["status"] == "recorded"
    assert post(live_api, {**base, "rating": "dislike", "user": "u3"}).json()["status"] == "unchanged"
    votes = live_api.redis.hgetall(live_api.keys.votes(fb["completion_id"]))
    assert {k.decode(): orjson.loads(v)["rating"] for k, v in votes.items()} == {"~anonymous": "dislike"}
    events = events_for(live_api, fb["completion_id"])
    assert [e["rating"] for e in events] == ["like", "dislike"]
    assert {e["user"] for e in events} == {f"ip:{events[0]['ip_hash']}"}  # the address votes, not the claim


def test_a_vote_without_the_user_is_checked_against_the_stored_owner(openai_client, live_api: LiveApi):
    # The widget may not know the user the completion was made for: the token is then checked against the
    # stored interaction's owner, and the vote counts as theirs.
    fb = complete(openai_client, live_api, user="owner-user")
    r = post(live_api, {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like"})
    assert r.status_code == 202 and r.json()["status"] == "recorded"
    (event,) = events_for(live_api, fb["completion_id"])
    assert event["user"] == "owner-user" and event["interaction"]["response"] == fb["text"]


@pytest.fixture
def voted_completion(openai_client, live_api: LiveApi) -> dict:
    return complete(openai_client, live_api, user="err-user")


def _errors(fb: dict, other: dict) -> list:
    cid, token = fb["completion_id"], fb["token"]
    ok = {"completion_id": cid, "token": token, "rating": "like", "user": "err-user"}
    past = int(time.time()) - 10
    return [
        ({**ok, "completion_id": "chatcmpl-doesnotexist"}, 404, "completion_not_found"),
        ({**ok, "token": token[:-4] + "AAAA"}, 403, "invalid_token"),
        ({**ok, "token": "garbage"}, 403, "invalid_token"),
        ({**ok, "token": other["token"]}, 403, "invalid_token"),  # another completion's token
        ({**ok, "token": sign(FEEDBACK_SECRET, cid, "err-user", past)}, 410, "expired"),
        ({**ok, "token": f"{past}.{token.partition('.')[2]}"}, 403, "invalid_token"),  # expiry edited
        ({**ok, "token": sign("another-secret", cid, "err-user", past + 10_000)}, 403, "invalid_token"),
        ({**ok, "user": "someone-else"}, 403, "user_mismatch"),
        ({**ok, "rating": "love"}, 422, "invalid_value"),
        ({**ok, "surprise": 1}, 422, "invalid_value"),
        ({k: v for k, v in ok.items() if k != "token"}, 422, "invalid_value"),
        ({**ok, "comment": ""}, 422, "invalid_value"),
        (b"{not json", 400, "invalid_json"),
        ({**ok, "comment": "x" * 2001}, 413, "field_too_long"),
        ({**ok, "correction": "y" * 8001}, 413, "field_too_long"),
    ]


def test_every_error_has_its_status_and_writes_nothing(openai_client, live_api: LiveApi, voted_completion):
    other = complete(openai_client, live_api, user="err-user")
    time.sleep(0.05)
    before = redis_state(live_api.redis, live_api.keys.prefix)
    for body, status, code in _errors(voted_completion, other):
        r = post(live_api, body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["code"] == code, (body, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert not writes_between(before, redis_state(live_api.redis, live_api.keys.prefix))
    # The real vote still goes through afterwards.
    ok = {
        "completion_id": voted_completion["completion_id"],
        "token": voted_completion["token"],
        "rating": "dislike",
        "user": "err-user",
    }
    assert post(live_api, ok).status_code == 202


def test_interaction_expired_from_redis_is_404_or_410(openai_client, live_api: LiveApi):
    fb = complete(openai_client, live_api)
    live_api.redis.delete(live_api.keys.interaction(fb["completion_id"]))
    r = post(live_api, {"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like"})
    assert r.status_code == 404
    past = int(time.time()) - 5
    expired = sign(FEEDBACK_SECRET, fb["completion_id"], None, past)
    r = post(live_api, {"completion_id": fb["completion_id"], "token": expired, "rating": "like"})
    assert r.status_code == 410


def test_per_user_rate_limit_is_429_and_writes_nothing(openai_client, live_api: LiveApi):
    burst = live_api.settings.feedback.burst_per_user
    completions = [complete(openai_client, live_api, user="rl-user") for _ in range(burst + 6)]
    votes = [{"completion_id": fb["completion_id"], "token": fb["token"], "rating": "like"} for fb in completions]
    with httpx.Client(base_url=live_api.base_url) as client:
        statuses = [client.post("/v1/feedback", json=v).status_code for v in votes[:burst]]
        assert statuses.count(202) == burst
        # The bucket refills one vote a second: on a slow machine a vote may find a fresh token, so try the
        # rest until one is refused, and check that the refused one wrote nothing.
        refused = None
        for v in votes[burst:]:
            before = redis_state(live_api.redis, live_api.keys.prefix)
            r = client.post("/v1/feedback", json=v)
            if r.status_code == 429:
                refused = r
                break
            assert r.status_code == 202, r.text
    assert refused is not None, "no vote was refused"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert not writes_between(before, redis_state(live_api.redis, live_api.keys.prefix))


def test_thousand_concurrent_duplicate_votes_leave_one(openai_client, live_api: LiveApi):
    fb = complete(openai_client, live_api)
    body = {
        "completion_id": fb["completion_id"],
        "token": fb["token"],
        "rating": "dislike",
        "user": "dup-user",
        "correction": "The better answer.",
    }

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=live_api.base_url, limits=limits, timeout=httpx.Timeout(120, pool=None)
        ) as client:
            return await asyncio.gather(*(client.post("/v1/feedback", json=body) for _ in range(1000)))

    responses = asyncio.run(storm())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {202, 429}
    results = [r.json().get("status") for r in responses if r.status_code == 202]
    assert results.count("recorded") == 1
    assert len(events_for(live_api, fb["completion_id"])) == 1
    votes = live_api.redis.hgetall(live_api.keys.votes(fb["completion_id"]))
    assert list(votes) == [b"~anonymous"]  # a completion without a user: one vote, whoever claims it


def test_cors_allow_list(live_api: LiveApi):
    allowed = ALLOWED_ORIGIN
    pre = httpx.options(
        live_api.base_url + "/v1/feedback",
        headers={
            "Origin": allowed,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == allowed
    assert "access-control-allow-credentials" not in pre.headers
    denied = httpx.options(
        live_api.base_url + "/v1/feedback",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in denied.headers


def test_widget_and_demo_page_are_served(live_api: LiveApi):
    js = httpx.get(live_api.base_url + "/widget/feedloop.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert len(js.content) < 10 * 1024
    page = httpx.get(live_api.base_url + "/")
    assert page.status_code == 200 and "feedloop.js" in page.text
