"""The registry's canary transitions against a real Redis (DB 15, a key prefix per test)."""

from __future__ import annotations

import pytest
import redis

from services.adapters.registry import CANARY_GROUP, AdapterRegistry, AsyncAdapterRegistry, NoCanary
from services.core.keys import Keys
from tests.integration.adapters.test_adapter_registry import Messages, add, statuses


def start(registry: AdapterRegistry, version: str, share: float = 0.1) -> str:
    promotion = registry.promote(version, auto=True, by="auto", canary_share=share)
    assert promotion.outcome == "canary"
    return promotion.previous or ""


def test_auto_promotion_with_a_share_starts_one_canary(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    v1, v2, v3 = add(registry), add(registry), add(registry)
    registry.promote(v1)
    messages = Messages(client, keys.promotions_channel)
    assert start(registry, v2, 0.25) == v1  # compared to the active version
    view = registry.view()
    assert (view.active, view.canary) == (v1, v2)
    record = view.get(v2)
    assert record is not None
    assert (record.status, record.canary_of, record.canary_share) == ("canary", v1, 0.25)
    assert record.canary_started_at is not None
    message = messages.take(1)[0]
    assert (message["canary"], message["event"], message["by"]) == (v2, "canary_started", "auto")
    assert message["at"] == pytest.approx(record.canary_started_at, abs=1e-3)
    # one canary at a time: the next candidate waits
    busy = registry.promote(v3, auto=True, canary_share=0.25)
    assert (busy.outcome, busy.previous) == ("canary_busy", v2)
    assert registry.promote(v2, auto=True, canary_share=0.25).outcome == "unchanged"
    assert statuses(registry) == {v1: "active", v2: "canary", v3: "candidate"}
    # the serving view (what replicas read) holds the canary too
    assert {a.version for a in registry.serving().adapters} == {v1, v2}
    # the canary's consumer group on the feedback stream lives as long as the canary
    groups = [g["name"] for g in client.xinfo_groups(keys.feedback_stream)]
    assert groups == [CANARY_GROUP.encode()]
    registry.abort_canary(v2)
    assert client.xinfo_groups(keys.feedback_stream) == []


def test_share_zero_and_manual_promotion_keep_straight_promotion(registry: AdapterRegistry) -> None:
    v1, v2 = add(registry), add(registry)
    assert registry.promote(v1, auto=True, canary_share=0.0).outcome == "promoted"
    assert registry.promote(v2, canary_share=0.5).outcome == "promoted"  # manual: never a canary
    view = registry.view()
    assert (view.active, view.previous, view.canary) == (v2, v1, None)


def test_pin_stops_canaries_too(registry: AdapterRegistry) -> None:
    v1, v2 = add(registry), add(registry)
    registry.pin(v1)
    assert registry.promote(v2, auto=True, canary_share=0.1).outcome == "pinned"
    assert registry.view().canary is None


def test_promoting_the_canary_makes_it_active_and_keeps_the_decision(registry: AdapterRegistry) -> None:
    v1, v2, v3 = add(registry), add(registry), add(registry)
    registry.promote(v1)
    registry.promote(v2)
    start(registry, v3)
    decision = {"outcome": "promote", "difference": 0.02, "lower": -0.01}
    assert registry.promote_canary(v3, decision).outcome == "promoted"
    view = registry.view()
    assert (view.active, view.previous, view.canary) == (v3, v2, None)
    assert statuses(registry) == {v1: "retired", v2: "previous", v3: "active"}
    record = view.get(v3)
    assert record is not None
    assert (record.canary_outcome, record.canary_decision, record.activated_by) == ("promoted", decision, "canary")
    with pytest.raises(NoCanary):  # the decision task cannot promote a version that is no longer the canary
        registry.promote_canary(v3)


def test_abort_retires_or_rejects_the_canary_and_leaves_active(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    v1, v2, v3 = add(registry), add(registry), add(registry)
    registry.promote(v1)
    start(registry, v2)
    messages = Messages(client, keys.promotions_channel)
    decision = {"outcome": "rollback", "upper": -0.04}
    assert registry.abort_canary(v2, ["worse than active"], decision, by="canary") == v2
    record = registry.get(v2)
    assert record is not None
    assert (record.status, record.reasons, record.canary_decision, record.canary_outcome) == (
        "retired", ["worse than active"], decision, "rolled_back",
    )  # fmt: skip
    assert messages.take(1)[0]["event"] == "canary_rolled_back"
    with pytest.raises(NoCanary):
        registry.abort_canary()
    # a hard failure rejects it (never promoted again)
    start(registry, v3)
    with pytest.raises(NoCanary):
        registry.abort_canary(v2)  # not the running canary
    registry.abort_canary(v3, ["degenerate answers 0.9"], None, by="canary", code="degenerate")
    record = registry.get(v3)
    assert record is not None and (record.status, record.reject_code) == ("rejected", "degenerate")
    view = registry.view()
    assert (view.active, view.canary) == (v1, None)


def test_rollback_reject_and_promoting_another_version_end_the_canary(registry: AdapterRegistry) -> None:
    v1, v2, v3, v4, v5 = (add(registry) for _ in range(5))
    registry.promote(v1)
    start(registry, v2)
    rolled = registry.rollback(by="operator")
    assert (rolled.outcome, rolled.version, rolled.previous) == ("canary_aborted", v1, v2)
    assert registry.get(v2).status == "retired"  # type: ignore[union-attr]
    assert registry.view().active == v1
    start(registry, v3)
    assert registry.reject(v3, ["sha256 mismatch"], "checksum", by="replica r1") == "rejected"
    view = registry.view()
    assert (view.active, view.canary, view.get(v3).canary_outcome) == (v1, None, "rejected")  # type: ignore[union-attr]
    start(registry, v4)
    registry.promote(v5)  # an operator promotes something else: the canary is retired as superseded
    view = registry.view()
    assert (view.active, view.previous, view.canary) == (v5, v1, None)
    record = view.get(v4)
    assert record is not None and (record.status, record.canary_outcome) == ("retired", "superseded")


async def test_async_registry_runs_the_same_canary_transitions(registry: AdapterRegistry, keys: Keys) -> None:
    import redis.asyncio as aioredis

    from tests.integration.adapters.conftest import REDIS_URL

    v1, v2 = add(registry), add(registry)
    registry.promote(v1)
    aclient = aioredis.Redis.from_url(REDIS_URL)
    try:
        areg = AsyncAdapterRegistry(aclient, keys)
        assert (await areg.promote(v2, auto=True, canary_share=0.3)).outcome == "canary"
        assert (await areg.serving()).canary == v2
        assert await areg.abort_canary(by="admin") == v2
        assert registry.view().canary is None
    finally:
        await aclient.aclose()
