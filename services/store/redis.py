"""Redis connections and the start-up safety check."""

from __future__ import annotations

import logging

from redis.asyncio import Redis

log = logging.getLogger(__name__)


class RedisUnsafe(RuntimeError):
    pass


def connect(url: str) -> Redis:
    return Redis.from_url(url, decode_responses=False, health_check_interval=30)


async def check_redis_safety(redis: Redis) -> None:
    """Refuse an evicting Redis (it would silently drop feedback and broker keys); warn without AOF."""
    policy = (await redis.config_get("maxmemory-policy")).get(b"maxmemory-policy", b"").decode()
    if policy and policy != "noeviction":
        raise RedisUnsafe(
            f"Redis maxmemory-policy is {policy!r}: feedloop needs 'noeviction', or feedback and queued tasks "
            "are silently evicted. Run: redis-cli CONFIG SET maxmemory-policy noeviction (and set it in redis.conf)."
        )
    aof = (await redis.config_get("appendonly")).get(b"appendonly", b"").decode()
    if aof != "yes":
        log.warning(
            "Redis has AOF off (appendonly=%s): feedback accepted since the last snapshot is lost if Redis "
            "restarts. Turn it on with 'appendonly yes'.", aof or "unknown"
        )
