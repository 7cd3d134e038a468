"""Leave the session's shared test server (tests/conftest.py ``live_api``) as other tests expect it.

Tests that promote adapters put the public alias back on the base model (:func:`serve_base_model`), and
tests that vote or run the trigger drop the short-lived keys they made (rate-limit buckets, trigger
windows: :func:`forget_ephemeral_keys`), so that no key of theirs expires in the middle of a later test
that compares Redis state before and after a request.
"""

from __future__ import annotations

import time

import httpx

from services.adapters.registry import AdapterRegistry
from tests.conftest import LiveApi


def serve_base_model(live_api: LiveApi, timeout: float = 30) -> None:
    """Retire the active and previous versions, clear the pin, and wait until the alias serves the base."""
    redis, keys = live_api.redis, live_api.keys
    for record in AdapterRegistry(redis, keys).view().adapters:
        if record.status in ("active", "previous"):
            redis.hset(keys.adapter(record.version), "status", "retired")
    redis.delete(keys.active_adapter, keys.previous_adapter, keys.adapter_pin, keys.canary_adapter)
    redis.publish(keys.promotions_channel, '{"version": null}')  # wakes the replica's reconcile
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        engine = httpx.get(live_api.base_url + "/admin/engine", headers=live_api.admin_headers(), timeout=30)
        if engine.json()["aliases"]["feedloop"] is None:
            return
        time.sleep(0.1)
    raise AssertionError("the server's alias still serves an adapter")


def forget_ephemeral_keys(live_api: LiveApi, max_ttl_s: float = 3600, workers_stopped: bool = False) -> int:
    """Delete the server's keys that expire within max_ttl_s (records kept for days are left alone). The locks of
    work in progress (a training run's lease, a snapshot's lock) go only once the caller's workers stopped:
    a worker may hold them right now."""
    locks = {live_api.keys.training_lease.encode(), live_api.keys.snapshot_lock.encode()}
    held = set() if workers_stopped else locks
    deleted = 0
    for key in live_api.redis.scan_iter(match=f"{live_api.keys.prefix}:*", count=1000):
        if key not in held and 0 < live_api.redis.pttl(key) <= max_ttl_s * 1000:
            deleted += int(live_api.redis.delete(key))
    return deleted
