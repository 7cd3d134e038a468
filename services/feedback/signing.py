"""Feedback tokens: an HMAC over the completion id, the user (if any) and an expiry.

Token format: ``<expires_at>.<base64url(hmac_sha256)>``. The expiry travels in clear so an expired
token can be told apart (410) from a forged one (403); changing it breaks the MAC.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Sequence


class TokenInvalid(ValueError):
    pass


class TokenExpired(ValueError):
    pass


def _mac(secret: str, completion_id: str, user: str | None, expires_at: int) -> str:
    msg = f"{completion_id}\x1f{user or ''}\x1f{expires_at}".encode("utf-8", "surrogatepass")
    digest = hmac.new(secret.encode(), msg, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign(secret: str, completion_id: str, user: str | None, expires_at: int) -> str:
    return f"{expires_at}.{_mac(secret, completion_id, user, expires_at)}"


def token_expiry(token: str) -> int | None:
    """The expiry a token carries in clear, or None when the token is malformed (any non-ASCII character,
    digits other than 0-9, a missing MAC): such a token is invalid, never an error."""
    expiry_text, _, mac = token.partition(".")
    if not (0 < len(expiry_text) <= 12 and expiry_text.isascii() and expiry_text.isdigit()):
        return None
    if not mac or not mac.isascii():
        return None
    return int(expiry_text)


def verify(
    secret: str | Sequence[str], token: str, completion_id: str, user: str | None, now: float | None = None
) -> int:
    """Return the token's expiry; raise TokenInvalid or TokenExpired. secret: the signing secret, or every
    secret that may have signed a live token (the current one first, then previous ones kept for rotation)."""
    expires_at = token_expiry(token)
    if expires_at is None:
        raise TokenInvalid("malformed feedback token")
    mac = token.partition(".")[2].encode()
    candidates = (secret,) if isinstance(secret, str) else secret
    if not any(hmac.compare_digest(mac, _mac(s, completion_id, user, expires_at).encode()) for s in candidates if s):
        raise TokenInvalid("feedback token does not match this completion")
    if (now if now is not None else time.time()) > expires_at:
        raise TokenExpired("feedback token has expired")
    return expires_at
