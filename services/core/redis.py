"""Redis connections and the start-up safety check."""

from __future__ import annotations

import logging

from redis.asyncio import BlockingConnectionPool, Redis

log = logging.getLogger(__name__)


class RedisUnsafe(RuntimeError):
    pass


def connect(url: str, max_connections: int = 128) -> Redis:
    """A client whose pool makes callers wait for a free connection instead of failing under bursts."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=30, health_check_interval=30)
    return Redis(connection_pool=pool)


async def check_redis_safety(redis: Redis) -> None:
    """Refuse an evicting Redis (it would silently drop feedback and broker keys); warn without AOF."""
    policy = await _config(redis, "maxmemory-policy")
    if policy and policy != "noeviction":
        raise RedisUnsafe(
            f"Redis maxmemory-policy is {policy!r}: feedloop needs 'noeviction', or feedback and queued tasks "
            "are silently evicted. Run: redis-cli CONFIG SET maxmemory-policy noeviction (and set it in redis.conf)."
        )
    aof = await _config(redis, "appendonly")
    if aof != "yes":
        log.warning(
            "Redis has AOF off (appendonly=%s): feedback accepted since the last snapshot is lost if Redis "
            "restarts. Turn it on with 'appendonly yes'.",
            aof or "unknown",
        )


async def _config(redis: Redis, name: str) -> str:
    values = await redis.config_get(name)
    for key, value in values.items():
        if (key.decode() if isinstance(key, bytes) else key) == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""
