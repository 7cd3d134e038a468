"""Feedback stream entries in exactly the contract format, for the pairing tests."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import orjson

_clock = itertools.count(1)


def feedback_event(
    completion_id: str,
    rating: str,
    user: str | None = "u1",
    *,
    prompt: str = "What is two plus two?",
    response: str = "Two plus two is four.",
    system: str | None = None,
    correction: str | None = None,
    comment: str | None = None,
    created_at: float | None = None,
    adapter: str | None = None,
    feedback_id: str | None = None,
    ip_hash: str = "iphash0000000000",
    anonymous: bool = False,
) -> dict[str, Any]:
    """anonymous: the completion was made without a user (as the API records it: interaction user null, the
    vote cast by the address's identity); user must then be None."""
    assert not (anonymous and user), "an anonymous completion's voter is its address"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return {
        "feedback_id": feedback_id or uuid.uuid4().hex,
        "completion_id": completion_id,
        "user": user,
        "ip_hash": ip_hash,
        "rating": rating,
        "comment": comment,
        "correction": correction,
        # strictly increasing unless given: the order events are written is the order they happened
        "created_at": created_at if created_at is not None else 1_700_000_000.0 + next(_clock) / 1000,
        "interaction": {
            "messages": messages,
            "response": response,
            "model": "feedloop",
            "adapter": adapter,
            "sampling": {"temperature": 0.7},
            **({"user": None} if anonymous else {}),
        },
    }


def entry(event: dict[str, Any] | bytes) -> dict[bytes, bytes]:
    """A stream entry's fields as XREADGROUP returns them."""
    return {b"event": event if isinstance(event, bytes) else orjson.dumps(event)}


def xadd(redis: Any, stream: str, event: dict[str, Any] | bytes) -> bytes:
    return redis.xadd(stream, entry(event))
