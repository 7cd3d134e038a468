"""One training run, end to end: snapshot -> train -> gate -> publish -> register -> (auto-)promote.

:func:`execute` is what the ``train.run`` task (and ``feedloop train --now``) calls with a run id the
trigger claimed. It is idempotent by run id: a run that is not ``queued`` any more (a redelivered task, a
second worker) is left alone. The run holds the training lease for its whole life, renewed by a heartbeat
thread, and every write it makes — run record, training state, registry — is fenced by the lease's token,
so a holder that lost the lease (paused past its TTL, partitioned) cannot overwrite a newer run's state.

If the worker dies, nothing here runs: the lease expires and the next trigger check marks the run failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis

from services.adapters.publish import publish_adapter
from services.adapters.registry import AdapterRegistry, StaleFence
from services.core import metrics
from services.core.config import Settings
from services.core.keys import Keys
from workers.training.lease import Heartbeat, Lease, LeaseBusy, LeaseClient, LeaseLost
from workers.training.runs import RunStore, encode

log = logging.getLogger(__name__)

# One run at a time per process: TRL's trainers share process-wide state (accelerate's AcceleratorState), so two
# runs in one worker's threads break each other. The lease keeps runs apart across workers; this covers a run
# whose lease expired (it learns so only when it next writes) while the next run starts in the same process.
_ONE_RUN_PER_PROCESS = threading.Lock()

# GATE_RESULTS reason label: the first failed rule, from a fixed set.
_GATE_REASONS = (
    ("accuracy", "low_accuracy"),
    ("does not beat", "not_better"),
    ("worse than", "worse"),
    ("smoke", "smoke_failed"),
    ("NaN", "nan"),
    ("no held-out pairs", "no_eval_pairs"),
    ("adapter does not load", "load_error"),
)


def gate_reason_label(reasons: list[str]) -> str:
    if not reasons:
        return "ok"
    return next((label for prefix, label in _GATE_REASONS if reasons[0].startswith(prefix)), "other")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class RunContext:
    """A running run: its lease, heartbeat and fenced writes."""

    def __init__(self, redis: Redis, keys: Keys, leases: LeaseClient, lease: Lease, heartbeat: Heartbeat) -> None:
        self.redis = redis
        self.keys = keys
        self.leases = leases
        self.lease = lease
        self.heartbeat = heartbeat
        self.run_id = lease.run_id

    def write(self, **fields: Any) -> None:
        self.heartbeat.check()
        self.leases.hset(self.lease, self.keys.run(self.run_id), encode(fields))

    def progress(self, record: dict[str, Any]) -> None:
        """Per-step training metrics; raising here aborts the trainer (the lease was lost)."""
        self.heartbeat.check()
        self.leases.rpush(self.lease, self.keys.run_history(self.run_id), json.dumps(record))


def execute(redis: Redis, keys: Keys, settings: Settings, run_id: str) -> dict[str, Any]:
    """Run a claimed training run; returns its final record (or the current one if it was not ours)."""
    runs = RunStore(redis, keys, runs_dir=Path(settings.data_dir) / "runs")
    run = runs.get(run_id)
    if run is None:
        log.warning("training run %s does not exist; nothing to do", run_id)
        return {"run_id": run_id, "status": "unknown"}
    leases = LeaseClient(redis, keys, settings.training.lease_ttl_s)
    try:
        lease = leases.acquire_for_run(run_id, worker_name())
    except ValueError:
        log.info("training run %s is %s already; this delivery does nothing", run_id, run["status"])
        return run
    except LeaseBusy as busy:
        runs.update(run_id, {"status": "failed", "finished_at": time.time(), "error": str(busy)})
        runs.release_slot(run_id)
        metrics.record_training_run("failure")
        return runs.get(run_id) or run

    started = time.monotonic()
    with Heartbeat(leases, lease) as heartbeat:
        ctx = RunContext(redis, keys, leases, lease, heartbeat)
        try:
            if not _ONE_RUN_PER_PROCESS.acquire(blocking=False):
                log.info("training run %s waits for this process's previous run to end", run_id)
                _ONE_RUN_PER_PROCESS.acquire()
            try:
                heartbeat.check()
                _pipeline(ctx, settings, started)
            finally:
                _ONE_RUN_PER_PROCESS.release()
        except (LeaseLost, StaleFence) as lost:
            # Another holder owns the lease now: write nothing. The trigger marks this run failed (and
            # counts the failure in feedloop_training_runs_total).
            log.error("training run %s stopped: %s", run_id, lost)
        except Exception as error:
            log.exception("training run %s failed", run_id)
            metrics.record_training_run("failure")
            with contextlib.suppress(LeaseLost, StaleFence):  # lost meanwhile: the trigger marks it failed
                ctx.write(status="failed", finished_at=time.time(), error=f"{type(error).__name__}: {error}"[:4000])
    if leases.release(lease):
        runs.release_slot(run_id)
    return runs.get(run_id) or run


def _pipeline(ctx: RunContext, settings: Settings, started: float) -> None:
    from workers.evaluation.gate import evaluate_adapter
    from workers.pairing import datasets
    from workers.training.trainer import run_training

    registry = AdapterRegistry(ctx.redis, ctx.keys, alias=settings.engine.alias)
    timings: dict[str, float] = {}

    step = time.monotonic()
    dataset = datasets.snapshot(ctx.redis, ctx.keys, settings)
    dataset_dir = Path(dataset["path"])
    timings["snapshot_s"] = time.monotonic() - step
    ctx.write(dataset_version=dataset["version"], dataset=dataset["counts"], timings=timings)
    # The trigger counts new pairs from this snapshot on (a failed run waits for new data or `train --now`).
    ctx.leases.hset(
        ctx.lease,
        ctx.keys.training_state,
        encode(
            {
                "last_run_id": ctx.run_id,
                "last_run_at": time.time(),
                "last_dataset_version": dataset["version"],
            }
        ),
    )

    view = registry.view()
    active = view.get(view.active)
    active_dir = active.path if active and Path(active.path).is_dir() else None
    parent_dir = active_dir if settings.training.continue_from_active else None

    step = time.monotonic()
    output_dir = Path(settings.data_dir) / "runs" / ctx.run_id
    result = run_training(
        settings,
        dataset_dir,
        output_dir,
        ctx.run_id,
        dataset["version"],
        parent_adapter_dir=parent_dir,
        progress=ctx.progress,
    )
    timings["train_s"] = time.monotonic() - step
    ctx.write(metrics=result.metrics, parent=result.parent, timings=timings)

    step = time.monotonic()
    gate = evaluate_adapter(settings, result.adapter_dir, dataset_dir / datasets.EVAL_FILE, active_dir)
    timings["gate_s"] = time.monotonic() - step
    gate_summary = {
        k: v
        for k, v in gate.metrics.items()
        if k in ("candidate", "reference_score", "reference", "comparison", "retention")
    }
    ctx.write(gate={"passed": gate.passed, "reasons": gate.reasons, **gate_summary}, timings=timings)

    step = time.monotonic()
    recorded: Any = ctx.redis.hget(ctx.keys.run(ctx.run_id), "version")
    version = recorded.decode() if recorded else registry.next_version(adapters_dir=settings.training.adapters_dir)
    ctx.write(version=version)
    manifest_metrics = {
        **result.manifest_metrics(),
        "gate_passed": gate.passed,
        "gate_accuracy": gate.metrics.get("candidate", {}).get("accuracy"),
        "gate_mean_margin": gate.metrics.get("candidate", {}).get("mean_margin"),
    }
    publish_adapter(
        result.adapter_dir,
        settings.training.adapters_dir,
        version,
        base_model=result.base_model,
        base_model_sha256=result.base_model_sha256,
        dataset_version=result.dataset_version,
        run_id=ctx.run_id,
        parent=result.parent,
        metrics=manifest_metrics,
        versions=result.versions,
    )
    path = str((Path(settings.training.adapters_dir) / version).resolve())
    registry.register(
        version,
        path,
        status="candidate" if gate.passed else "rejected",
        run_id=ctx.run_id,
        dataset_version=result.dataset_version,
        parent=result.parent,
        metrics=manifest_metrics,
        gate={"passed": gate.passed, **gate_summary},
        reasons=gate.reasons,
        reject_code=None if gate.passed else "gate",
        fence=ctx.lease.fence,
    )
    timings["publish_s"] = time.monotonic() - step

    status = "rejected"
    if gate.passed:
        status = "gated"
        if settings.gate.auto_promote:
            promotion = registry.promote(
                version, auto=True, by="auto", fence=ctx.lease.fence, canary_share=settings.canary.share
            )
            status = {"promoted": "promoted", "unchanged": "promoted", "canary": "canary"}.get(
                promotion.outcome, "gated"
            )
            if promotion.outcome in ("pinned", "canary_busy"):
                log.info(
                    "run %s: %s stays a candidate (%s %s)", ctx.run_id, version, promotion.outcome, promotion.previous
                )
    timings["total_s"] = time.monotonic() - started
    ctx.write(status=status, finished_at=time.time(), timings=timings, reasons=gate.reasons)

    metrics.record_training_run(
        "success",
        seconds=timings["train_s"],
        loss=result.metrics.get("train_loss"),
        reward_accuracy=result.metrics.get("eval_rewards/accuracies"),
        reward_margin=result.metrics.get("eval_rewards/margins"),
        dataset_pairs=int(dataset["counts"].get("train", 0)) + int(dataset["counts"].get("eval", 0)),
    )
    metrics.GATE_RESULTS.labels("passed" if gate.passed else "rejected", gate_reason_label(gate.reasons)).inc()
    log.info(
        "training run %s: %s %s (gate %s)",
        ctx.run_id,
        status,
        version,
        "passed" if gate.passed else gate.reasons,
    )
