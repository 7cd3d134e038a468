"""Celery tasks: thin wrappers around the pure modules. Logic lives in consumer.py, generation.py,
datasets.py."""

from __future__ import annotations

import os
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from redis import Redis

from services.core.config import get_settings
from services.core.keys import Keys
from services.core.redis import connect_sync
from workers.celery_app import PAIRS_QUEUE, app


@lru_cache
def _redis(pid: int) -> Redis:  # one client per worker process (keyed by pid: never shared across fork)
    settings = get_settings()
    return connect_sync(settings.redis_url, settings)  # socket timeouts and keep-alive


@lru_cache
def _consumer(pid: int) -> Any:
    from workers.pairing.consumer import FeedbackConsumer

    settings = get_settings()
    return FeedbackConsumer(_redis(pid), Keys(settings.redis_prefix), settings)


@app.task(name="pairs.consume")
def consume(max_seconds: float | None = None, until_drained: bool = False) -> dict[str, int]:
    """Turn feedback from the stream into pairs for up to max_seconds (default pairs.consume_seconds)."""
    consumer = _consumer(os.getpid())
    seconds = max_seconds if max_seconds is not None else get_settings().pairs.consume_seconds
    report = asdict(consumer.consume(seconds, until_drained=until_drained))
    check_after_write(report.get("pairs_written", 0))
    return report


@app.task(name="pairs.generate")
def generate(strategies: list[str] | None = None) -> dict[str, Any]:
    """Generate weaker/stronger answers for liked/disliked responses that have no counterpart."""
    from workers.pairing.generation import generate_pairs

    settings = get_settings()
    report = generate_pairs(_redis(os.getpid()), Keys(settings.redis_prefix), settings, strategies=strategies)
    check_after_write(sum(r.get("written", 0) for r in report.values() if isinstance(r, dict)))
    return report


@app.task(name="pairs.compact")
def compact() -> dict[str, int]:
    """Remove pairing state and pairs older than pairs.retention_s (Redis memory levels off)."""
    from workers.pairing.retention import compact as compact_pairs

    settings = get_settings()
    return compact_pairs(_redis(os.getpid()), Keys(settings.redis_prefix), settings)


@app.task(name="pairs.snapshot")
def snapshot() -> dict[str, Any]:
    """Freeze the current pairs into a new dataset version; returns its manifest."""
    from workers.pairing.datasets import snapshot as take_snapshot

    settings = get_settings()
    return take_snapshot(_redis(os.getpid()), Keys(settings.redis_prefix), settings)


@app.task(name="canary.check", queue=PAIRS_QUEUE)
def check_canary() -> dict[str, Any]:
    """Beat's canary check: read the canary's votes and counters, promote or roll back when decided."""
    from workers.evaluation.canary_check import check_canary as check

    settings = get_settings()
    return check(_redis(os.getpid()), Keys(settings.redis_prefix), settings).to_dict()


# --- training ---------------------------------------------------------------------------------------------


@app.task(name="train.check", queue=PAIRS_QUEUE)
def check_training() -> dict[str, Any]:
    """Beat's periodic check: mark dead runs failed, and claim + enqueue a run when there is enough new data.

    Runs on the always-on CPU queue (``pairs``), not ``train``: a train worker that died must not take the
    stale-run detection down with it.
    """
    from workers.training.trigger import Trigger

    settings = get_settings()
    trigger = Trigger(_redis(os.getpid()), Keys(settings.redis_prefix), settings)
    return trigger.check(enqueue=enqueue_run).to_dict()


def check_after_write(pairs_written: int, check: Any = None) -> bool:
    """Run the training check right after pairs were written, besides beat's periodic one.

    Beat's check waits for a free worker slot and expires after a few seconds, so under load it fired late and
    a run trained on whatever had piled up by then (twice min_pairs, measured). Checking where pairs are written
    starts a run within one batch of the threshold. The check is idempotent (a per-window claim), so running it
    from several places never starts two runs."""
    if pairs_written <= 0:
        return False
    (check or check_training)()
    return True


def enqueue_run(run_id: str) -> None:
    # The task id is the run id: one message per run, and a duplicate delivery finds the run not queued.
    run_training.apply_async(args=[run_id], task_id=run_id)


# acks_late=False: the message is acknowledged when the run starts, so the broker never re-delivers a run
# that outlives the Redis transport's visibility_timeout. A run whose worker dies is not lost: its lease
# expires and the next train.check marks it failed (and starts a fresh run when the data still call for one).
@app.task(name="train.run", acks_late=False)
def run_training(run_id: str) -> dict[str, Any]:
    """Execute one claimed training run (idempotent by run id)."""
    from workers.training.job import execute

    settings = get_settings()
    record = execute(_redis(os.getpid()), Keys(settings.redis_prefix), settings, run_id)
    return {"run_id": run_id, "status": record.get("status"), "version": record.get("version")}
