"""Fixtures of the registry tests: a real Redis (DB 15) under a key prefix of its own per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from services.adapters.registry import AdapterRegistry
from services.core.keys import Keys

REDIS_URL = os.environ.get("FEEDLOOP_REGISTRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def keys() -> Keys:
    return Keys(f"registry-test-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def client(keys: Keys) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def registry(client: redis.Redis, keys: Keys) -> AdapterRegistry:
    return AdapterRegistry(client, keys, alias="feedloop", reserved=("feedloop-base",))
