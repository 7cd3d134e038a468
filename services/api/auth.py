"""Who is calling: API keys on the chat API, admin credentials on /admin, per-app chat quotas.

With ``api.auth`` on, the chat API needs ``Authorization: Bearer <key>`` (an app key, or an admin key);
the caller's app namespaces the completion's user (``app:user``). Feedback stays token-based (the browser
widget holds only the per-completion signed token). Admin routes take ``api.admin_token`` or an admin key.
Key lookups are cached for ``api.key_cache_s`` (a revoked key stops working within that time); while Redis
is unreachable, a key seen before keeps working, and an unknown one gets 503.
"""

from __future__ import annotations

import hmac
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.api.errors import ApiError
from services.core.apikeys import ApiKey, digest
from services.core.config import Settings
from services.core.keys import Keys

log = logging.getLogger(__name__)

_STALE_S = 600.0  # how long a cached key serves while Redis is unreachable

# A token bucket {tokens, ts}: returns {1} when a token was taken, else {0, seconds until one is there}.
_BUCKET = """
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - (tonumber(b[2]) or now)) * rate)
if tokens < 1 then return {0, tostring((1 - tokens) / rate)} end
redis.call('HSET', KEYS[1], 'tokens', tokens - 1, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {1, '0'}
"""


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: app None when auth is off (no namespace, no quota)."""

    app: str | None = None
    role: str | None = None
    key_id: str | None = None
    chat_rate: float = -1.0  # the key's own quotas (-1: the settings')
    vote_rate: float = -1.0


ANONYMOUS = Caller()


def bearer(request: Request) -> str | None:
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyCache:
    """Key lookups by digest, cached for ttl_s; a stale entry serves while Redis is down."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float):
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    async def get(self, secret: str) -> ApiKey | None:
        d = digest(secret)
        now = time.monotonic()
        hit = self._cache.get(d)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            raw: Any = await self.redis.hgetall(self.keys.api_key(d))
        except RedisError:
            if hit is not None and hit[1] is not None and now - hit[0] < _STALE_S:
                return hit[1]
            raise
        key = ApiKey.from_hash(raw) if raw else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[d] = (now, key)
        return key


def _unauthorized(message: str, code: str) -> ApiError:
    return ApiError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})


def _is_admin_token(settings: Settings, token: str) -> bool:
    expected = settings.api.admin_token
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


async def _key(request: Request, token: str) -> ApiKey | None:
    cache: KeyCache = request.app.state.key_cache
    try:
        return await cache.get(token)
    except RedisError:
        raise ApiError(
            503,
            "API keys cannot be checked right now (the store is unreachable); retry shortly.",
            code="store_unavailable",
            headers={"Retry-After": "5"},
        ) from None


async def authenticate(request: Request) -> Caller:
    """The chat API's caller (auth off: ANONYMOUS, whatever the headers say)."""
    settings: Settings = request.app.state.settings
    if not settings.api.auth:
        return ANONYMOUS
    token = bearer(request)
    if token is None:
        raise _unauthorized(
            "You didn't provide an API key: send 'Authorization: Bearer <key>' (create one with "
            "`feedloop keys create --app NAME`).",
            "missing_api_key",
        )
    if _is_admin_token(settings, token):
        return Caller(app="admin", role="admin")
    key = await _key(request, token)
    if key is None:
        raise _unauthorized("Incorrect API key provided.", "invalid_api_key")
    return Caller(app=key.app, role=key.role, key_id=key.id, chat_rate=key.chat_rate, vote_rate=key.vote_rate)


CallerDep = Annotated[Caller, Depends(authenticate)]


async def require_admin(request: Request) -> None:
    """/admin: the admin token or an admin key (404 while neither the token is set nor auth is on)."""
    settings: Settings = request.app.state.settings
    if not settings.api.admin_token and not settings.api.auth:
        raise ApiError(404, "Admin routes are off: set FEEDLOOP_API__ADMIN_TOKEN.", code="admin_disabled")
    token = bearer(request)
    if token is not None and _is_admin_token(settings, token):
        return
    if token is not None and settings.api.auth:
        key = await _key(request, token)
        if key is not None and key.role == "admin":
            return
    raise _unauthorized("A valid admin bearer token is required.", "invalid_admin_token")


def namespaced_user(caller: Caller, user: str | None) -> str | None:
    """The completion's user: ``app:user`` for an app's caller, so one app cannot speak for another's users."""
    if caller.app is None or user is None:
        return user
    return f"{caller.app}:{user}"


async def take_chat_quota(request: Request, caller: Caller) -> None:
    """Spend one token of the caller's app chat bucket (429 with Retry-After when empty). Fails open when
    Redis is unreachable: chat keeps serving."""
    if caller.app is None:
        return
    settings: Settings = request.app.state.settings
    rate = caller.chat_rate if caller.chat_rate >= 0 else settings.api.app_chat_rate
    if rate <= 0:
        return
    burst = max(1, settings.api.app_chat_burst)
    keys: Keys = request.app.state.keys
    redis: Redis = request.app.state.redis
    try:
        taken, wait = await redis.eval(  # type: ignore[misc]
            _BUCKET, 1, keys.rate_limit("app-chat", caller.app), rate, burst, repr(time.time())
        )
    except RedisError as e:
        log.warning("chat quota of app %s not checked (Redis: %s)", caller.app, e)
        return
    if int(taken) != 1:
        retry = max(1, round(float(wait) + 0.5))
        raise ApiError(
            429,
            f"This app's chat quota is spent; retry in {retry}s.",
            code="rate_limited",
            headers={"Retry-After": str(retry)},
        )
