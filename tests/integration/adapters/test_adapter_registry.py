"""The adapter registry's transitions against a real Redis (DB 15, a key prefix per test)."""

from __future__ import annotations

import json
import os
import threading

import pytest
import redis

from services.adapters.registry import (
    AdapterRegistry,
    AsyncAdapterRegistry,
    InvalidVersion,
    NoPrevious,
    StaleFence,
    UnknownVersion,
    VersionExists,
    VersionRejected,
)
from services.core.keys import Keys

REDIS_URL = os.environ.get("FEEDLOOP_REGISTRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def add(registry: AdapterRegistry, **kwargs) -> str:
    version = registry.next_version()
    registry.register(version, f"/adapters/{version}", run_id=f"run-{version}", **kwargs)
    return version


def statuses(registry: AdapterRegistry) -> dict[str, str]:
    return {a.version: a.status for a in registry.view().adapters}


class Messages:
    """Collects what the registry publishes on the promotions channel."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        self.pubsub.get_message(timeout=1)  # the subscribe confirmation

    def take(self, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            message = self.pubsub.get_message(timeout=2)
            assert message is not None, f"only {len(out)} of {count} messages published"
            out.append(json.loads(message["data"]))
        return out


def test_versions_are_numbered_and_immutable(registry: AdapterRegistry) -> None:
    first, second = add(registry, dataset_version="ds-000001", parent=None), add(registry)
    assert (first, second) == ("feedloop-v1", "feedloop-v2")
    record = registry.get(first)
    assert record is not None
    assert (record.status, record.number, record.dataset_version, record.run_id) == (
        "candidate", 1, "ds-000001", "run-feedloop-v1",
    )  # fmt: skip
    with pytest.raises(VersionExists):
        registry.register(first, "/elsewhere", run_id="another-run")
    assert registry.register(first, "/elsewhere", run_id="run-feedloop-v1") == "exists"  # same run: idempotent
    assert registry.get(first).path == "/adapters/feedloop-v1"  # type: ignore[union-attr]
    # An explicitly named version moves the counter past its number.
    registry.register("feedloop-v7", "/adapters/feedloop-v7")
    assert registry.next_version() == "feedloop-v8"
    for bad in ("feedloop", "feedloop-base", "../etc", ""):
        with pytest.raises(InvalidVersion):
            registry.register(bad, "/x")


def test_promote_moves_active_to_previous_and_retires_the_older(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    v1, v2, v3 = add(registry), add(registry), add(registry)
    messages = Messages(client, keys.promotions_channel)
    assert registry.promote(v1) == registry.promote(v1).__class__("promoted", v1, None)
    assert registry.promote(v1).outcome == "unchanged"
    assert registry.promote(v2).previous == v1
    assert statuses(registry) == {v1: "previous", v2: "active", v3: "candidate"}
    registry.promote(v3)
    view = registry.view()
    assert (view.active, view.previous) == (v3, v2)
    assert statuses(registry) == {v1: "retired", v2: "previous", v3: "active"}
    published = messages.take(3)
    assert [m["version"] for m in published] == [v1, v2, v3]
    assert published[2]["path"] == f"/adapters/{v3}" and published[2]["at"] == pytest.approx(
        view.get(v3).promoted_at  # type: ignore[union-attr]
    )
    with pytest.raises(UnknownVersion):
        registry.promote("feedloop-v99")


def test_rollback_restores_previous_and_retires_the_bad_one(registry: AdapterRegistry) -> None:
    with pytest.raises(NoPrevious):
        registry.rollback()
    v1, v2 = add(registry), add(registry)
    registry.promote(v1)
    registry.promote(v2)
    result = registry.rollback()
    assert (result.outcome, result.version, result.previous) == ("rolled_back", v1, v2)
    view = registry.view()
    assert (view.active, view.previous) == (v1, None)
    assert statuses(registry) == {v1: "active", v2: "retired"}
    assert view.get(v1).activated_by == "rollback" and view.get(v2).rolled_back_at is not None  # type: ignore[union-attr]
    with pytest.raises(NoPrevious):
        registry.rollback()
    assert registry.promote(v2).outcome == "promoted"  # a retired version can be promoted again on purpose


def test_pin_stops_auto_promotion_until_unpinned(registry: AdapterRegistry) -> None:
    v1, v2 = add(registry), add(registry)
    assert registry.pin(v1).outcome == "promoted"
    skipped = registry.promote(v2, auto=True)
    assert (skipped.outcome, skipped.previous) == ("pinned", v1)
    assert registry.view().active == v1 and registry.get(v2).status == "candidate"  # type: ignore[union-attr]
    assert registry.promote(v2).outcome == "promoted"  # a manual promotion still works, the pin stays
    assert registry.view().pinned == v1
    assert registry.unpin() == v1 and registry.unpin() is None
    v3 = add(registry)
    assert registry.promote(v3, auto=True).outcome == "promoted"


def test_reject_never_promotes_and_reverts_an_active_version(registry: AdapterRegistry) -> None:
    v1, v2, v3 = add(registry), add(registry), add(registry)
    assert registry.reject(v3, ["smoke: empty output"], "gate", by="gate") == "rejected"
    with pytest.raises(VersionRejected):
        registry.promote(v3)
    record = registry.get(v3)
    assert record is not None and (record.reasons, record.reject_code, record.rejected_by) == (
        ["smoke: empty output"], "gate", "gate",
    )  # fmt: skip
    registry.promote(v1)
    registry.promote(v2)
    # A replica could not load the active version: the registry goes back to what replicas still serve.
    assert registry.reject(v2, ["checksum_mismatch: ..."], "checksum_mismatch", by="replica") == "reverted"
    view = registry.view()
    assert (view.active, view.previous) == (v1, None)
    assert view.get(v1).activated_by == "revert"  # type: ignore[union-attr]
    assert registry.reject(v2, ["again"], "x") == "unchanged"
    assert registry.reject(v1, ["bad"], "x") == "reverted"
    assert registry.view().active is None  # nothing left: the base model serves


def test_fenced_writes_are_refused_once_the_lease_moved(
    registry: AdapterRegistry, client: redis.Redis, keys: Keys
) -> None:
    client.set(keys.training_lease, "7:run-1")
    stale, current = (keys.training_lease, "6:run-0"), (keys.training_lease, "7:run-1")
    with pytest.raises(StaleFence):
        registry.register("feedloop-v1", "/a", run_id="run-0", fence=stale)
    assert registry.get("feedloop-v1") is None
    assert registry.register("feedloop-v1", "/a", run_id="run-1", fence=current) == "registered"
    with pytest.raises(StaleFence):
        registry.promote("feedloop-v1", auto=True, fence=stale)
    assert registry.view().active is None
    assert registry.promote("feedloop-v1", auto=True, fence=current).outcome == "promoted"


def test_concurrent_promotions_keep_exactly_one_active(registry: AdapterRegistry) -> None:
    versions = [add(registry) for _ in range(12)]
    barrier = threading.Barrier(len(versions))

    def promote(version: str) -> None:
        barrier.wait()
        registry.promote(version)

    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = list(statuses(registry).values())
    assert counts.count("active") == 1 and counts.count("previous") == 1 and counts.count("retired") == 10
    view = registry.view()
    assert statuses(registry)[view.active] == "active" and statuses(registry)[view.previous] == "previous"  # type: ignore[index]


async def test_async_registry_sees_the_same_state(registry: AdapterRegistry, keys: Keys) -> None:
    from redis.asyncio import Redis

    v1, v2 = add(registry), add(registry)
    client = Redis.from_url(REDIS_URL)
    try:
        areg = AsyncAdapterRegistry(client, keys, alias="feedloop")
        assert (await areg.promote(v1)).outcome == "promoted"
        await areg.pin(v2)
        serving = await areg.serving()
        assert (serving.active, serving.previous, serving.pinned) == (v2, v1, v2)
        assert [a.version for a in serving.adapters] == [v2, v1]
        assert (await areg.rollback()).version == v1
        assert registry.view().active == v1
    finally:
        await client.aclose()
