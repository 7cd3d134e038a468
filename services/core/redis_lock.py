"""A Redis lock for work that must not run twice at once: SET NX PX with a random token, released only by
its holder (compare and delete), so a holder whose lock expired cannot release the next one's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from redis import Redis

_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


@contextmanager
def redis_lock(redis: Redis, key: str, ttl_ms: int) -> Iterator[bool]:
    """Yields True while this caller holds ``key`` (for at most ttl_ms), False when another holder has it."""
    token = uuid.uuid4().hex
    held = bool(redis.set(key, token, nx=True, px=ttl_ms))
    try:
        yield held
    finally:
        if held:
            redis.eval(_RELEASE, 1, key, token)
