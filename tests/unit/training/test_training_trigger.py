"""The training trigger's pure rules: when to start a run, check windows, stale runs, gate reason labels."""

from __future__ import annotations

import pytest

from services.core.config import TrainingSettings
from workers.celery_app import PAIRS_QUEUE, TRAIN_QUEUE, create_app
from workers.training.job import gate_reason_label
from workers.training.trigger import backoff_remaining, decide, stale_reason, window

CFG = TrainingSettings(min_pairs=200, min_pairs_floor=50, max_interval_s=3600)


@pytest.mark.parametrize(
    ("new_pairs", "since", "start", "reason"),
    [
        (200, 10.0, True, "enough_pairs"),
        (199, 10.0, False, "waiting_for_pairs"),
        (199, None, False, "waiting_for_pairs"),
        (50, 3600.0, True, "interval_elapsed"),
        (49, 3600.0, False, "too_few_pairs"),
        (50, 3599.0, False, "waiting_for_pairs"),
        (0, 10 * 3600.0, False, "too_few_pairs"),
        (500, None, True, "enough_pairs"),
    ],
)
def test_decide(new_pairs: int, since: float | None, start: bool, reason: str) -> None:
    decision = decide(new_pairs, since, CFG)
    assert (decision.start, decision.reason, decision.new_pairs) == (start, reason, new_pairs)


BACKOFF = TrainingSettings(failure_backoff_s=600, max_interval_s=3000)


@pytest.mark.parametrize(
    ("statuses", "since_failure", "remaining"),
    [
        ([], 0.0, 0.0),  # no run yet
        (["promoted", "failed"], 0.0, 0.0),  # the newest run succeeded
        (["rejected"], 0.0, 0.0),  # a gate rejection is not a failure of the job
        (["failed"], 100.0, 500.0),
        (["failed"], 600.0, 0.0),
        (["failed", "failed", "promoted"], 100.0, 1100.0),  # doubles with each failure in a row
        (["failed"] * 10, 0.0, 3000.0),  # capped at max_interval_s
    ],
)
def test_backoff_after_failed_runs(statuses: list[str], since_failure: float, remaining: float) -> None:
    now = 10_000.0
    runs = [{"status": s, "finished_at": now - since_failure} for s in statuses]
    assert backoff_remaining(runs, now, BACKOFF) == pytest.approx(remaining)
    assert backoff_remaining(runs, now, TrainingSettings(failure_backoff_s=0)) == 0.0


def test_window_groups_checks_by_interval() -> None:
    assert window(1000.0, 120) == window(1079.9, 120) == 8
    assert window(1080.0, 120) == 9
    assert window(5.0, 0) == 5  # a zero interval still gives a window per second


def test_a_running_run_is_stale_only_when_its_lease_is_gone_or_someone_elses() -> None:
    run = {"run_id": "run-3", "status": "running", "queued_at": 0.0}
    assert stale_reason(run, "12:run-3", now=1e9, queue_timeout_s=10) is None
    assert stale_reason(run, None, now=0, queue_timeout_s=10) is not None
    assert stale_reason(run, "13:run-4", now=0, queue_timeout_s=10) is not None
    assert stale_reason(run, "12:run-33", now=0, queue_timeout_s=10) is not None  # not a suffix match on id


def test_a_queued_run_is_stale_after_the_queue_timeout() -> None:
    run = {"run_id": "run-1", "status": "queued", "queued_at": 100.0}
    assert stale_reason(run, None, now=150.0, queue_timeout_s=60) is None
    assert "queue_timeout_s" in (stale_reason(run, None, now=161.0, queue_timeout_s=60) or "")
    assert stale_reason({"run_id": "run-1", "status": "promoted"}, None, now=1e9, queue_timeout_s=1) is None


def test_gate_reason_labels_come_from_a_fixed_set() -> None:
    assert gate_reason_label([]) == "ok"
    assert gate_reason_label(["accuracy 0.500 (6/12) below gate.min_accuracy 0.75"]) == "low_accuracy"
    assert gate_reason_label(["does not beat base: accuracy ..."]) == "not_better"
    assert gate_reason_label(["worse than feedloop-v1: accuracy ..."]) == "worse"
    assert gate_reason_label(["smoke: empty output for prompt 'x'"]) == "smoke_failed"
    assert gate_reason_label(["something new"]) == "other"


def test_training_tasks_route_and_ack_as_documented() -> None:
    from workers import tasks

    app = create_app()
    router = app.amqp.router
    check = router.route(tasks.check_training._get_exec_options(), "train.check")
    assert check["queue"].name == PAIRS_QUEUE  # stale-run detection must not need a live train worker
    assert router.route({}, "train.run")["queue"].name == TRAIN_QUEUE
    # Acked when the run starts: a run longer than the visibility timeout is never delivered twice.
    assert tasks.run_training.acks_late is False
    schedule = app.conf.beat_schedule["check-training"]
    assert schedule["task"] == "train.check" and schedule["options"]["queue"] == PAIRS_QUEUE
