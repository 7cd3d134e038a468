"""The Celery app: Redis broker, queues ``pairs`` (CPU) and ``train`` (GPU), routes, beat schedule.

``app`` exists at import time but holds no configuration until Celery first needs it: its defaults are a
callable (``app.add_defaults(fn)`` is evaluated lazily when the app configures), so settings are read from
``get_settings()`` at that moment, after the environment is in place, and importing this module never
touches Redis or the environment. ``create_app(settings)`` builds an app for an explicit Settings object.

Start a worker with ``celery -A workers.celery_app worker -Q pairs`` (or ``feedloop worker``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery import Celery
from kombu import Queue

from services.core.config import Settings, get_settings
from services.core.metrics import instrument_celery

PAIRS_QUEUE = "pairs"
TRAIN_QUEUE = "train"

# A Redis-broker task not acked within this time is delivered again. Long training runs must outlive it
# or be idempotent (training runs use a lease with a fencing token); a pairing task takes seconds.
VISIBILITY_TIMEOUT_S = 6 * 3600


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic tasks. Each entry expires before the next one is due, so a busy worker never piles up
    stale copies."""
    pairs = settings.pairs
    schedule: dict[str, dict[str, Any]] = {
        "consume-feedback": {
            "task": "pairs.consume",
            "schedule": timedelta(seconds=pairs.consume_interval_s),
            "options": {"expires": pairs.consume_interval_s},
        },
    }
    if pairs.retention_s > 0:
        schedule["compact-pairs"] = {
            "task": "pairs.compact",
            "schedule": timedelta(seconds=pairs.compact_interval_s),
            "options": {"expires": pairs.compact_interval_s},
        }
    schedule["check-training"] = {
        "task": "train.check",
        "schedule": timedelta(seconds=settings.training.check_interval_s),
        # On the CPU queue: stale-run detection must not depend on a live train worker.
        "options": {"expires": settings.training.check_interval_s, "queue": PAIRS_QUEUE},
    }
    if settings.canary.share > 0:
        schedule["check-canary"] = {
            "task": "canary.check",
            "schedule": timedelta(seconds=settings.canary.check_interval_s),
            "options": {"expires": settings.canary.check_interval_s, "queue": PAIRS_QUEUE},
        }
    if {"weaker_answer", "stronger_answer"} & set(pairs.strategies):
        schedule["generate-answers"] = {
            "task": "pairs.generate",
            "schedule": timedelta(seconds=pairs.generate_interval_s),
            "options": {"expires": pairs.generate_interval_s},
        }
    return schedule


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "result_expires": 24 * 3600,
        "task_ignore_result": True,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            # broker keys live beside feedloop's own keys, under the same prefix
            "global_keyprefix": f"{settings.redis_prefix}:celery:",
            # a partitioned broker fails a publish or a read instead of hanging the worker forever
            "socket_timeout": settings.redis_socket_timeout_s,
            "socket_connect_timeout": settings.redis_connect_timeout_s,
            "socket_keepalive": True,
        },
        "result_backend_transport_options": {"global_keyprefix": f"{settings.redis_prefix}:celery:"},
        "redis_socket_timeout": settings.redis_socket_timeout_s,
        "redis_socket_connect_timeout": settings.redis_connect_timeout_s,
        "redis_socket_keepalive": True,
        "task_queues": (Queue(PAIRS_QUEUE), Queue(TRAIN_QUEUE)),
        "task_default_queue": PAIRS_QUEUE,
        "task_routes": {"pairs.*": {"queue": PAIRS_QUEUE}, "train.*": {"queue": TRAIN_QUEUE}},
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,  # a lost task waits for the visibility timeout, never loops
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "timezone": "UTC",
        "beat_schedule": beat_schedule(settings),
        "worker_hijack_root_logger": False,
        # One process per worker keeps its Prometheus registry whole (see services/core/metrics.py).
        "worker_pool": "threads",
    }


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from settings (get_settings() when none is given, read lazily)."""
    celery = Celery("feedloop", include=["workers.tasks"])
    if settings is None:
        celery.add_defaults(lambda: celery_config(get_settings()))
    else:
        celery.add_defaults(celery_config(settings))
    instrument_celery(celery)
    return celery


app = create_app()
