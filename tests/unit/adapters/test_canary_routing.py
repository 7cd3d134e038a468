"""Sticky canary routing (services/adapters/canary.py): deterministic, proportional, monotone in the share."""

from __future__ import annotations

import subprocess
import sys

from services.adapters.canary import canary_bucket, routes_to_canary

USERS = [f"app-1:user-{i}" for i in range(10_000)]


def test_a_user_is_routed_the_same_way_everywhere() -> None:
    first = [routes_to_canary("feedloop-v7", 0.1, user) for user in USERS]
    assert first == [routes_to_canary("feedloop-v7", 0.1, user) for user in USERS]
    # ... in another process too (a second replica, or this one after a restart): no per-process hash seed.
    code = (
        "from services.adapters.canary import routes_to_canary; "
        f"print(''.join('1' if routes_to_canary('feedloop-v7', 0.1, f'app-1:user-{{i}}') else '0' "
        f"for i in range({len(USERS)})))"
    )
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert other == "".join("1" if routed else "0" for routed in first)


def test_the_share_is_respected_and_raising_it_only_adds_users() -> None:
    ten = {user for user in USERS if routes_to_canary("feedloop-v7", 0.1, user)}
    twenty = {user for user in USERS if routes_to_canary("feedloop-v7", 0.2, user)}
    assert 850 < len(ten) < 1150 and 1800 < len(twenty) < 2200
    assert ten < twenty
    assert not any(routes_to_canary("feedloop-v7", 0.0, user) for user in USERS[:100])
    assert all(routes_to_canary("feedloop-v7", 1.0, user) for user in USERS[:100])


def test_each_canary_draws_other_users_and_namespaces_stay_apart() -> None:
    v7 = {user for user in USERS if routes_to_canary("feedloop-v7", 0.1, user)}
    v8 = {user for user in USERS if routes_to_canary("feedloop-v8", 0.1, user)}
    assert len(v7 & v8) < 200  # independent draws overlap by ~10% of 10%, not fully
    assert canary_bucket("feedloop-v7", "app-1:alice") != canary_bucket("feedloop-v7", "app-2:alice")
    assert 0 <= canary_bucket("feedloop-v7", "") < 1


def test_requests_without_a_user_are_split_per_request() -> None:
    draws = iter([0.05, 0.5, 0.09, 0.99])
    routed = [routes_to_canary("feedloop-v7", 0.1, None, draw=lambda: next(draws)) for _ in range(4)]
    assert routed == [True, False, True, False]
