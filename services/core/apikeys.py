"""API keys: product apps call the chat API with ``Authorization: Bearer <key>``; admin keys open /admin.

A key is shown once, when it is created; Redis keeps only its sha256 (``Keys.api_key(digest)``, a hash with
the key's id, app, role, quotas and creation time) and an index id -> digest (``Keys.api_keys``) for
listing and revoking. The id is the first 12 hex digits of the digest: it names a key in listings and logs
without revealing it. App names are the namespace of their users (``app:user``), so they hold no ``:``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from redis import Redis

from services.core.keys import Keys

Role = Literal["app", "admin"]
ROLES: tuple[Role, ...] = ("app", "admin")
_SECRET_PREFIX = {"app": "flk-", "admin": "fla-"}
APP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ApiKeyError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKey:
    id: str
    app: str
    role: str
    created_at: float
    chat_rate: float = -1.0  # requests/s for this app's chat bucket; -1: the setting's default
    vote_rate: float = -1.0  # votes/s for this app's vote bucket; -1: the setting's default

    def to_hash(self) -> dict[Any, Any]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> ApiKey:
        d = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return cls(
            id=d["id"],
            app=d["app"],
            role=d.get("role", "app"),
            created_at=float(d.get("created_at", 0)),
            chat_rate=float(d.get("chat_rate", -1)),
            vote_rate=float(d.get("vote_rate", -1)),
        )


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def new_secret(role: Role) -> str:
    return _SECRET_PREFIX[role] + secrets.token_urlsafe(32)


def check_app(app: str) -> str:
    if not APP_NAME.match(app):
        raise ApiKeyError(
            f"invalid app name {app!r}: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return app


class ApiKeyStore:
    """Create, list and revoke keys (a synchronous client: the CLI and the API's start-up)."""

    def __init__(self, redis: Redis, keys: Keys):
        self.redis = redis
        self.keys = keys

    def create(
        self, app: str, role: Role = "app", *, chat_rate: float = -1.0, vote_rate: float = -1.0
    ) -> tuple[str, ApiKey]:
        """A new key for app; returns (the secret, shown only now; its record)."""
        secret = new_secret(role)
        return secret, self.add(secret, app, role, chat_rate=chat_rate, vote_rate=vote_rate)

    def add(
        self, secret: str, app: str, role: Role = "app", *, chat_rate: float = -1.0, vote_rate: float = -1.0
    ) -> ApiKey:
        """Register a given secret (the chart's first key); a no-op when it is registered already."""
        if role not in ROLES:
            raise ApiKeyError(f"invalid role {role!r} (app or admin)")
        if len(secret) < 16:
            raise ApiKeyError("an API key must be at least 16 characters")
        check_app(app)
        d = digest(secret)
        existing: Any = self.redis.hgetall(self.keys.api_key(d))
        if existing:
            return ApiKey.from_hash(existing)
        key = ApiKey(d[:12], app, role, time.time(), chat_rate, vote_rate)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.api_key(d), mapping=key.to_hash())
        pipe.hset(self.keys.api_keys, key.id, d)
        pipe.execute()
        return key

    def list(self) -> list[ApiKey]:
        index: Any = self.redis.hgetall(self.keys.api_keys)
        out = []
        for raw_digest in index.values():
            d = raw_digest.decode() if isinstance(raw_digest, bytes) else raw_digest
            raw: Any = self.redis.hgetall(self.keys.api_key(d))
            if raw:
                out.append(ApiKey.from_hash(raw))
        return sorted(out, key=lambda k: (k.created_at, k.id))

    def revoke(self, key_id_or_secret: str) -> ApiKey | None:
        """Revoke a key by its id (or by the key itself); returns what was revoked, None if unknown."""
        d: Any = self.redis.hget(self.keys.api_keys, key_id_or_secret)
        d = d.decode() if isinstance(d, bytes) else d
        if d is None:
            d = digest(key_id_or_secret)
        raw: Any = self.redis.hgetall(self.keys.api_key(d))
        if not raw:
            return None
        key = ApiKey.from_hash(raw)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.api_key(d))
        pipe.hdel(self.keys.api_keys, key.id)
        pipe.execute()
        return key
