"""The vote script on a real Redis: one round trip checks the interaction's owner, the rate limits and
writes the vote, its history and the stream event built from the stored interaction."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis

from services.core.keys import Keys
from services.feedback.votes import FeedbackStore, Limits
from tests.conftest import TEST_REDIS_URL, redis_state
from tests.support.redis_server import private_redis

OPEN = Limits(user_rate=100.0, user_burst=100, ip_rate=100.0, ip_burst=100)


@pytest.fixture
async def store() -> AsyncIterator[FeedbackStore]:
    redis = Redis.from_url(TEST_REDIS_URL)
    keys = Keys(f"test-fbstore-{uuid.uuid4().hex[:8]}")
    store = FeedbackStore(redis, keys, ttl_s=600, limits=OPEN)
    yield store
    await store.aclose()
    async for key in redis.scan_iter(match=f"{keys.prefix}:*"):
        await redis.delete(key)
    await redis.aclose()


def _record(completion_id: str, user: str | None, adapter: str | None = "feedloop-v2") -> dict:
    return {
        "id": completion_id,
        "messages": [{"role": "user", "content": 'Say "hi" \\ politely'}],
        "response": "Hi! ü",
        "model": "feedloop",
        "adapter": adapter,
        "sampling": {"temperature": 0.7, "stop": []},
        "user": user,
    }


def _head(completion_id: str, voter: str) -> dict:
    return {"feedback_id": uuid.uuid4().hex, "completion_id": completion_id, "user": voter, "rating": "like"}


def _sync_state(store: FeedbackStore) -> dict:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(TEST_REDIS_URL)
    try:
        return redis_state(client, store.keys.prefix)
    finally:
        client.close()


async def _vote(store: FeedbackStore, cid: str, voter: str, **kw) -> object:
    state = {"rating": "like", "comment": None, "correction": None}
    return await store.vote(cid, voter, "iphash", state, _head(cid, voter), 1000.0, **kw)


async def test_the_event_embeds_the_stored_interaction_verbatim(store: FeedbackStore):
    cid = "chatcmpl-stored"
    record = _record(cid, "alice")
    await store.redis.set(store.keys.interaction(cid), orjson.dumps(record))
    outcome = await _vote(store, cid, "alice", token_user="alice")
    assert outcome.status == "recorded" and outcome.adapter == "feedloop-v2"
    [(_, fields)] = await store.redis.xrange(store.keys.feedback_stream)
    event = orjson.loads(fields[b"event"])
    assert event["interaction"] == record  # unicode, quotes, backslashes and empty lists survive
    assert event["completion_id"] == cid and event["user"] == "alice"
    assert (await _vote(store, cid, "alice", token_user="alice")).status == "unchanged"


async def test_a_buffered_interaction_is_taken_from_the_arguments(store: FeedbackStore):
    cid = "chatcmpl-buffered"
    record = _record(cid, None, adapter=None)
    outcome = await _vote(store, cid, "ip:iphash", token_user=None, record=orjson.dumps(record))
    assert outcome.status == "recorded" and outcome.adapter is None
    [(_, fields)] = await store.redis.xrange(store.keys.feedback_stream)
    assert orjson.loads(fields[b"event"])["interaction"] == record
    assert await store.redis.get(store.keys.interaction(cid)) is None  # the API's writer stores it, not the vote


@pytest.mark.parametrize(
    ("owner", "token_user"),
    [("alice", "mallory"), ("alice", None), (None, "mallory")],
)
async def test_a_token_for_another_owner_writes_nothing(store: FeedbackStore, owner, token_user):
    cid = "chatcmpl-owned"
    await store.redis.set(store.keys.interaction(cid), orjson.dumps(_record(cid, owner)))
    before = _sync_state(store)
    outcome = await _vote(store, cid, token_user or "ip:iphash", token_user=token_user)
    assert outcome.status == "bad_token"
    assert _sync_state(store) == before


async def test_an_unknown_interaction_writes_nothing(store: FeedbackStore):
    outcome = await _vote(store, "chatcmpl-nowhere", "alice", token_user="alice")
    assert outcome.status == "missing"
    assert _sync_state(store) == {}


async def test_votes_survive_a_flushed_script_cache_and_concurrent_callers_share_round_trips(tmp_path):
    # SCRIPT FLUSH is server-wide: on a private redis-server, never the Redis other suites share
    with private_redis(tmp_path / "redis") as server:
        redis = Redis.from_url(server.url)
        store = FeedbackStore(redis, Keys("test-fbstore-flush"), ttl_s=600, limits=OPEN)
        try:
            await _vote(store, "chatcmpl-none", "x", token_user="x")  # the script is loaded now ...
            await store.redis.script_flush()  # ... and gone, as after a Redis restart: the next call gets NOSCRIPT
            cids = [f"chatcmpl-many-{i}" for i in range(50)]
            for cid in cids:
                await store.redis.set(store.keys.interaction(cid), orjson.dumps(_record(cid, f"user-{cid}")))
            outcomes = await asyncio.gather(
                *(_vote(store, cid, f"user-{cid}", token_user=f"user-{cid}") for cid in cids)
            )
            assert [o.status for o in outcomes] == ["recorded"] * 50
            assert await store.redis.xlen(store.keys.feedback_stream) == 50
        finally:
            await store.aclose()
            await redis.aclose()


async def test_a_dropped_connection_is_replaced_without_failing_the_vote(store: FeedbackStore):
    cid = "chatcmpl-reconnect"
    await store.redis.set(store.keys.interaction(cid), orjson.dumps(_record(cid, "alice")))
    assert (await _vote(store, cid, "alice", token_user="alice")).status == "recorded"
    # Redis drops the batcher's own connection (as when it restarts); nobody else's.
    port = store._script._connection._writer.get_extra_info("sockname")[1]
    [client] = [c for c in await store.redis.client_list() if c["addr"].endswith(f":{port}")]
    await store.redis.client_kill_filter(_id=client["id"])
    state = {"rating": "dislike", "comment": None, "correction": None}
    outcome = await store.vote(cid, "alice", "iphash", state, _head(cid, "alice"), 1001.0, token_user="alice")
    assert outcome.status == "recorded"
    assert await store.redis.xlen(store.keys.feedback_stream) == 2
