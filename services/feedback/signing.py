"""Feedback tokens: an HMAC over the completion id, the user (if any) and an expiry.

Token format: ``<expires_at>.<base64url(hmac_sha256)>``. The expiry travels in clear so an expired
token can be told apart (410) from a forged one (403); changing it breaks the MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


class TokenInvalid(ValueError):
    pass


class TokenExpired(ValueError):
    pass


def _mac(secret: str, completion_id: str, user: str | None, expires_at: int) -> str:
    msg = f"{completion_id}\x1f{user or ''}\x1f{expires_at}".encode()
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(secret: str, completion_id: str, user: str | None, expires_at: int) -> str:
    return f"{expires_at}.{_mac(secret, completion_id, user, expires_at)}"


def verify(secret: str, token: str, completion_id: str, user: str | None, now: float | None = None) -> int:
    """Return the token's expiry; raise TokenInvalid or TokenExpired."""
    expiry_text, _, mac = token.partition(".")
    if not expiry_text.isdigit() or not mac:
        raise TokenInvalid("malformed feedback token")
    expires_at = int(expiry_text)
    if not hmac.compare_digest(mac, _mac(secret, completion_id, user, expires_at)):
        raise TokenInvalid("feedback token does not match this completion")
    if (now if now is not None else time.time()) > expires_at:
        raise TokenExpired("feedback token has expired")
    return expires_at
