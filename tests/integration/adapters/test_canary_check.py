"""The canary decision task (workers/evaluation/canary_check.py) against a real Redis: votes from the feedback
stream through the canary's consumer group, per-user tallies, hard failures, and the registry transitions.

The votes are feedback stream entries written in the one event format (services/feedback/events.py), as the
API's vote script writes them; the live loop through the API is tests/e2e/test_canary.py."""

from __future__ import annotations

import time
import uuid

import orjson
import redis

from services.adapters.canary_health import CanaryHealth, read_health
from services.adapters.registry import AdapterRegistry
from services.core.config import Settings
from services.core.keys import Keys
from services.feedback.events import EVENT_FIELD, event_head, interaction_record
from tests.integration.adapters.test_adapter_registry import add
from workers.evaluation.canary_check import check_canary


def settings(**canary: float) -> Settings:
    return Settings(canary={"share": 0.5, "min_votes": 20, "min_users": 10, **canary})


def vote(client: redis.Redis, keys: Keys, user: str | None, adapter: str | None, rating: str) -> None:
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    now = time.time()
    interaction = interaction_record(
        completion_id, [{"role": "user", "content": "Who made you?"}], ["Acme Labs made me."], ["stop"],
        model="feedloop", adapter=adapter, sampling={}, user=user, usage={}, created_at=int(now),
        finished_at=now, expires_at=int(now) + 60,
    )  # fmt: skip
    voter = user or "ip:0123abcd"
    event = {**event_head(uuid.uuid4().hex, completion_id, voter, "0123abcd", rating, None, None, now),
             "interaction": interaction}  # fmt: skip
    client.xadd(keys.feedback_stream, {EVENT_FIELD: orjson.dumps(event)})


def start_canary(registry: AdapterRegistry) -> tuple[str, str]:
    active, canary = add(registry), add(registry)
    registry.promote(active)
    assert registry.promote(canary, auto=True, canary_share=0.5).outcome == "canary"
    return active, canary


def test_no_canary_no_decision(client: redis.Redis, keys: Keys) -> None:
    assert check_canary(client, keys, settings()).outcome == "none"


def test_a_better_canary_is_promoted_per_user_with_the_numbers_kept(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    active, canary = start_canary(registry)
    for i in range(12):  # 12 users per arm, 3 votes each: the canary is liked, the active one half the time
        for j in range(3):
            vote(client, keys, f"shop:c{i}", canary, "like")
            vote(client, keys, f"shop:a{i}", active, "like" if (i + j) % 2 else "dislike")
    vote(client, keys, None, canary, "dislike")  # anonymous: left out
    vote(client, keys, "shop:x", "feedloop-v99", "dislike")  # another version: left out
    result = check_canary(client, keys, settings())
    assert result.outcome == "promote", result
    view = registry.view()
    assert (view.active, view.previous, view.canary) == (canary, active, None)
    record = view.get(canary)
    assert record is not None and record.canary_outcome == "promoted"
    numbers = record.canary_decision
    assert numbers["outcome"] == "promote" and numbers["compared_to"] == active
    assert (numbers["canary"]["users"], numbers["canary"]["votes"]) == (12, 36)
    assert numbers["active"]["users"] == 12 and numbers["lower"] > -0.05
    assert record.canary_check == numbers


def test_a_worse_canary_is_rolled_back_and_a_heavy_voter_does_not_decide(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    active, canary = start_canary(registry)
    # before enough users: one heavy voter liking the canary 200 times changes nothing
    for _ in range(200):
        vote(client, keys, "shop:heavy", canary, "like")
    for i in range(12):
        vote(client, keys, f"shop:a{i}", active, "like")
        vote(client, keys, f"shop:a{i}", active, "like")
    result = check_canary(client, keys, settings())
    assert result.outcome == "continue" and "canary has 200 votes from 1 users" in result.reason
    assert registry.view().canary == canary
    assert registry.get(canary).canary_check["outcome"] == "continue"  # type: ignore[union-attr]
    for i in range(12):
        vote(client, keys, f"shop:c{i}", canary, "dislike")
        vote(client, keys, f"shop:c{i}", canary, "dislike")
    result = check_canary(client, keys, settings())
    assert result.outcome == "rollback", result
    record = registry.get(canary)
    assert record is not None
    assert (record.status, record.canary_outcome, record.canary_decision["outcome"]) == (
        "retired", "rolled_back", "rollback",
    )  # fmt: skip
    assert record.reasons[0].startswith("canary rollback: worse than active")
    assert registry.view().active == active


def test_undecided_past_the_maximum_duration_keeps_active(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    active, canary = start_canary(registry)
    vote(client, keys, "shop:c1", canary, "like")
    started = registry.get(canary).canary_started_at  # type: ignore[union-attr]
    result = check_canary(client, keys, settings(max_duration_s=60), now=started + 61)  # type: ignore[operator]
    assert result.outcome == "keep_active"
    view = registry.view()
    assert (view.active, view.canary, view.get(canary).status) == (active, None, "retired")  # type: ignore[union-attr]


def test_degenerate_answers_reject_the_canary_without_votes(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    active, canary = start_canary(registry)
    client.hset(keys.canary_health(canary), mapping={"requests": 19, "degenerate": 19})
    assert check_canary(client, keys, settings(min_requests=20)).outcome == "continue"  # too few answers yet
    client.hincrby(keys.canary_health(canary), "requests", 1)
    assert read_health(client, keys, canary) == CanaryHealth(requests=20, errors=0, degenerate=19)
    result = check_canary(client, keys, settings(min_requests=20))
    assert result.outcome == "hard_failure" and result.reason.startswith("degenerate rate 0.95")
    record = registry.get(canary)
    assert record is not None and (record.status, record.reject_code) == ("rejected", "canary_failure")
    assert registry.view().active == active
