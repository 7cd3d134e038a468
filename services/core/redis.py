"""Redis connections and the start-up safety check.

Every client feedloop builds (API, workers, CLI; the Celery broker gets the same numbers in
workers/celery_app.py) has socket connect and read timeouts and TCP keep-alive: in a network partition a
command fails after ``redis_socket_timeout_s`` instead of hanging every request queued behind it, and one
retry on a fresh connection covers a connection that a restart or a proxy dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import redis as redis_sync
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, ResponseError
from redis.retry import Retry

if TYPE_CHECKING:
    from services.core.config import Settings

log = logging.getLogger(__name__)

DEFAULT_SOCKET_TIMEOUT_S = 5.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30


class RedisUnsafe(RuntimeError):
    pass


def client_options(
    settings: Settings | None = None,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
) -> dict[str, Any]:
    """Timeouts, keep-alive and retry of every feedloop Redis client (explicit values win over settings)."""
    if socket_timeout_s is None:
        socket_timeout_s = settings.redis_socket_timeout_s if settings else DEFAULT_SOCKET_TIMEOUT_S
    if connect_timeout_s is None:
        connect_timeout_s = settings.redis_connect_timeout_s if settings else DEFAULT_CONNECT_TIMEOUT_S
    return {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
    }


def _retry(asynchronous: bool) -> Any:
    from redis.asyncio.retry import Retry as AsyncRetry

    # One more try on a fresh connection after a dropped one (a restart, a proxy's idle timeout), not redis-py's
    # three, and none after a timeout: a partition must fail after one socket timeout, not four.
    backoff = ExponentialBackoff(cap=0.5, base=0.05)
    errors = (ConnectionError,)
    return AsyncRetry(backoff, 1, supported_errors=errors) if asynchronous else Retry(backoff, 1, errors)


def connect(
    url: str,
    max_connections: int = 128,
    *,
    settings: Settings | None = None,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
) -> Redis:
    """An asyncio client whose pool makes callers wait for a free connection instead of failing under bursts."""
    options = client_options(settings, socket_timeout_s, connect_timeout_s)
    pool = BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=30, retry=_retry(True), **options
    )
    return Redis(connection_pool=pool)


def connect_sync(
    url: str,
    settings: Settings | None = None,
    *,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float | None = None,
) -> redis_sync.Redis:
    """A sync client (workers, CLI) with the same timeouts and keep-alive."""
    options = client_options(settings, socket_timeout_s, connect_timeout_s)
    return redis_sync.Redis.from_url(url, retry=_retry(False), **options)


async def check_redis_safety(redis: Redis) -> None:
    """Refuse an evicting Redis (it would silently drop feedback and broker keys); warn without AOF.

    Managed Redis services often disable CONFIG: the check then cannot see the policy and only warns."""
    try:
        policy = await _config(redis, "maxmemory-policy")
    except ResponseError as error:
        log.warning(
            "Redis refused CONFIG GET (%s), so feedloop cannot check its eviction policy and persistence. Make "
            "sure the server runs with maxmemory-policy noeviction (an evicting Redis silently drops feedback "
            "and queued tasks) and with AOF on.",
            error,
        )
        return
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
