"""Pure rules of the trust boundary: token parsing and rotation, forwarded addresses, namespaced users."""

from __future__ import annotations

import time

import pytest

from services.api.auth import Caller, namespaced_user
from services.api.routes.feedback import forwarded_ip
from services.feedback.signing import TokenExpired, TokenInvalid, sign, token_expiry, verify

FUTURE = int(time.time()) + 3600


@pytest.mark.parametrize(
    "token",
    ["9999999999.é", "².x", "٣٣٣.abc", "12.éé", "", ".", "12.", ".abc", "1" * 40 + ".x", "-5.abc", " 12.abc"],
)
def test_malformed_tokens_are_invalid_not_errors(token: str):
    with pytest.raises(TokenInvalid):
        verify("s", token, "chatcmpl-1", None)


def test_token_expiry_reads_only_ascii_digits():
    assert token_expiry(f"{FUTURE}.abc") == FUTURE
    assert token_expiry("².x") is None and token_expiry("٣٣٣.abc") is None and token_expiry("9.é") is None


def test_rotation_new_signs_old_verifies_until_expiry():
    token_old = sign("old", "c1", "u", FUTURE)
    token_new = sign("new", "c1", "u", FUTURE)
    assert verify(["new", "old"], token_old, "c1", "u") == FUTURE
    assert verify(["new", "old"], token_new, "c1", "u") == FUTURE
    with pytest.raises(TokenInvalid):
        verify(["new"], token_old, "c1", "u")
    with pytest.raises(TokenInvalid):
        verify(["new", "old"], sign("other", "c1", "u", FUTURE), "c1", "u")
    past = int(time.time()) - 5
    with pytest.raises(TokenExpired):
        verify(["new", "old"], sign("old", "c1", "u", past), "c1", "u")


@pytest.mark.parametrize(
    "header, hops, expected",
    [
        (None, 0, "10.0.0.1"),
        ("6.6.6.6", 0, "10.0.0.1"),  # 0 hops: the socket address, whatever the header says
        ("6.6.6.6, 203.0.113.9", 1, "203.0.113.9"),  # the ingress appended what it saw
        ("6.6.6.6, 203.0.113.9, 10.1.1.1", 2, "203.0.113.9"),
        ("203.0.113.9", 2, "10.0.0.1"),  # fewer entries than proxies: not trusted, the socket address
        (" , ,", 1, "10.0.0.1"),
        (None, 1, "10.0.0.1"),
    ],
)
def test_forwarded_ip_takes_the_nth_from_the_right(header: str | None, hops: int, expected: str):
    assert forwarded_ip("10.0.0.1", header, hops) == expected


def test_users_are_namespaced_by_app():
    assert namespaced_user(Caller(app="shop"), "alice") == "shop:alice"
    assert namespaced_user(Caller(app="shop"), None) is None
    assert namespaced_user(Caller(), "alice") == "alice"
