"""A canary's hard-failure counters in Redis: the API counts its answers, the decision task reads them.

One hash per canary version (Keys.canary_health): ``requests``, ``errors`` (the engine failed the request),
``degenerate`` (empty or looping answers, services/core/repetition.py). Every replica adds to the same hash,
so the decision sees the canary's answers over the whole deployment. The hash expires a week after the last
answer (a canary lasts ``canary.max_duration_s``, two days by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.core.keys import Keys

TTL_S = 7 * 86400
OUTCOMES = ("ok", "error", "degenerate")


@dataclass(frozen=True)
class CanaryHealth:
    requests: int = 0
    errors: int = 0
    degenerate: int = 0

    def failure(self, min_requests: int, max_error_rate: float, max_degenerate_rate: float) -> str | None:
        """Why the canary must be rolled back at once (None: no hard failure, or too few answers to say)."""
        if self.requests < min_requests:
            return None
        for name, count, limit in (
            ("error", self.errors, max_error_rate),
            ("degenerate", self.degenerate, max_degenerate_rate),
        ):
            if count / self.requests > limit:
                return f"{name} rate {count / self.requests:.2f} over {limit:.2f} ({count} of {self.requests} answers)"
        return None


async def record_answer(redis: Any, keys: Keys, version: str, outcome: str) -> None:
    """Count one answer of the canary (ok, error or degenerate)."""
    key = keys.canary_health(version)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(key, "requests", 1)
        if outcome != "ok":
            pipe.hincrby(key, "errors" if outcome == "error" else "degenerate", 1)
        pipe.expire(key, TTL_S)
        await pipe.execute()


def read_health(redis: Any, keys: Keys, version: str) -> CanaryHealth:
    raw = redis.hgetall(keys.canary_health(version))
    fields = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return CanaryHealth(fields.get("requests", 0), fields.get("errors", 0), fields.get("degenerate", 0))
