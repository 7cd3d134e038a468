"""Sticky canary routing: which users a canary version serves (pure logic, no Redis).

A user is routed to the canary when the hash of (canary version, user key) falls below the canary share.
The user key is the app-namespaced user id (the trust boundary's stable identity), so:

* every replica routes the same user the same way, also after a restart (nothing but the registry's
  canary version and share is needed);
* a user keeps one version for the whole canary (their votes then measure one arm);
* raising the share only adds users (a user below 10% is below 20% too);
* each canary draws a different set of users (the version salts the hash), so the same 10% of users do
  not carry every experiment.

Requests without a user are split per request (``random``) and their votes are left out of the decision
(they cannot be counted per user).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable


def canary_bucket(canary_version: str, user_key: str) -> float:
    """The user's place in [0, 1) for this canary: the first 8 bytes of sha256(version NUL user)."""
    digest = hashlib.sha256(f"{canary_version}\0{user_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def routes_to_canary(
    canary_version: str,
    share: float,
    user_key: str | None,
    draw: Callable[[], float] = random.random,
) -> bool:
    """Whether this request goes to the canary: sticky per user, a fresh draw for requests without one."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    if not user_key:
        return draw() < share
    return canary_bucket(canary_version, user_key) < share
