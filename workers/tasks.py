"""Celery tasks: thin wrappers around the pure modules. Logic lives in consumer.py, generation.py,
datasets.py."""

from __future__ import annotations

import os
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from redis import Redis

from services.config import get_settings
from services.store.keys import Keys
from workers.celery_app import app


@lru_cache
def _redis(pid: int) -> Redis:  # one client per worker process (keyed by pid: never shared across fork)
    return Redis.from_url(get_settings().redis_url)


@lru_cache
def _consumer(pid: int) -> Any:
    from workers.consumer import FeedbackConsumer

    settings = get_settings()
    return FeedbackConsumer(_redis(pid), Keys(settings.redis_prefix), settings)


@app.task(name="pairs.consume")
def consume(max_seconds: float | None = None, until_drained: bool = False) -> dict[str, int]:
    """Turn feedback from the stream into pairs for up to max_seconds (default pairs.consume_seconds)."""
    consumer = _consumer(os.getpid())
    seconds = max_seconds if max_seconds is not None else get_settings().pairs.consume_seconds
    return asdict(consumer.consume(seconds, until_drained=until_drained))


@app.task(name="pairs.generate")
def generate(strategies: list[str] | None = None) -> dict[str, Any]:
    """Generate weaker/stronger answers for liked/disliked responses that have no counterpart."""
    from workers.generation import generate_pairs

    settings = get_settings()
    return generate_pairs(_redis(os.getpid()), Keys(settings.redis_prefix), settings, strategies=strategies)


@app.task(name="pairs.snapshot")
def snapshot() -> dict[str, Any]:
    """Freeze the current pairs into a new dataset version; returns its manifest."""
    from workers.datasets import snapshot as take_snapshot

    settings = get_settings()
    return take_snapshot(_redis(os.getpid()), Keys(settings.redis_prefix), settings)
