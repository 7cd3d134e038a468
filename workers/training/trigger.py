"""When to train: the periodic check that beat runs (task ``train.check``), and ``feedloop train --now``.

A run starts when the pairs stored since the last run's dataset snapshot reach ``training.min_pairs``, or
when ``training.max_interval_s`` has passed since the last run (since the first check, before any run) and
at least ``training.min_pairs_floor`` new pairs are there. :func:`decide` is that rule, pure.

A due run first waits (at most ``training.generation_wait_s``) for the generated pairs whose candidates were
pending when it became due. Generation rounds run apart from the votes, so without the wait the snapshot would
take the weaker-answer pairs (the liked answer against the base model's) that happened to be written by then:
one demo's run got 42 of them, the same users' run again 69, and the held-out answers those pairs anchor fell
15.4 and 5.8 points. Candidates arriving during the wait are left to the next run, so the wait is bounded.

Starting is idempotent, because beat can run twice (two beat processes, a restarted one) and tasks can be
delivered twice. :func:`check_training` claims a run in one Lua script that

* refuses while the run slot (Keys.current_run) holds a queued or running run: never two runs at once;
  (before that, a periodic check also waits while a canary runs: a new candidate could not be promoted until
  live votes decide the canary, so it would train on stale data for nothing);
* sets the per-window key (Keys.trigger_window(now // check_interval_s)) with SET NX: at most one run
  per check window, however many beat processes fired in it;
* creates the run record (queued) and takes the slot.

Only then is the ``train.run`` task sent, with the run id as its task id. Before deciding, the check sweeps
for stale runs: a ``running`` run whose lease has expired (its worker was SIGKILLed or lost) is marked
``failed`` and frees the slot, as is a ``queued`` run older than ``training.queue_timeout_s``. A worker
that still holds the lease is never declared dead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from services.core import metrics
from services.core.config import Settings, TrainingSettings
from services.core.keys import Keys
from workers.pairing.rules import GENERATED_STRATEGIES
from workers.training.runs import ACTIVE, RunStore, encode

log = logging.getLogger(__name__)

STALE_SCAN = 20  # recent runs examined for staleness at each check
DUE_AT = "due_at"  # training_state field: when the rule first called for the run now waiting on generation

# KEYS: current slot, window key, run hash, runs index. ARGV: run id, window ttl ms (0: no window), now,
# field/value pairs of the new run record.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then return {'run_in_progress', holder} end
if ARGV[2] ~= '0' and not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'window_taken', redis.call('GET', KEYS[2]) or ''}
end
redis.call('SET', KEYS[1], ARGV[1])
local fields = {}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
return {'claimed', ARGV[1]}
"""

# KEYS: run hash, current slot, lease. ARGV: run id, expected status, now, error.
# Marks a run failed only if it is still in the expected status and (when running) its lease is gone.
_FAIL_STALE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[2] then return 0 end
if ARGV[2] == 'running' then
  local holder = redis.call('GET', KEYS[3])
  if holder and string.sub(holder, -string.len(ARGV[1]) - 1) == ':' .. ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[3], 'error', ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""


@dataclass(frozen=True)
class Decision:
    start: bool
    reason: str  # enough_pairs | interval_elapsed | forced | too_few_pairs | waiting_for_pairs
    new_pairs: int
    since_last_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(new_pairs: int, since_last_s: float | None, cfg: TrainingSettings) -> Decision:
    """The trigger rule. ``since_last_s``: time since the last run started (None: unknown, counts as 0)."""
    if new_pairs >= cfg.min_pairs:
        return Decision(True, "enough_pairs", new_pairs, since_last_s)
    if since_last_s is not None and since_last_s >= cfg.max_interval_s:
        if new_pairs >= cfg.min_pairs_floor:
            return Decision(True, "interval_elapsed", new_pairs, since_last_s)
        return Decision(False, "too_few_pairs", new_pairs, since_last_s)
    return Decision(False, "waiting_for_pairs", new_pairs, since_last_s)


def waits_for_generation(pending: int, due_at: float, now: float, wait_s: float) -> bool:
    """Whether a due run still waits: ``pending`` generation candidates date from before ``due_at``, and less than
    ``wait_s`` has passed since."""
    return pending > 0 and now - due_at < wait_s


def backoff_remaining(recent_runs: list[dict[str, Any]], now: float, cfg: TrainingSettings) -> float:
    """Seconds the trigger still waits after failed runs (0: none). Runs newest first; the wait doubles with
    each failure in a row, so a broken setup does not start a doomed run at every check."""
    failures = 0
    for run in recent_runs:
        if run.get("status") != "failed":
            break
        failures += 1
    if failures == 0 or cfg.failure_backoff_s <= 0:
        return 0.0
    wait = min(cfg.failure_backoff_s * 2 ** (failures - 1), max(cfg.max_interval_s, cfg.failure_backoff_s))
    failed_at = recent_runs[0].get("finished_at") or recent_runs[0].get("created_at") or now
    return max(0.0, float(failed_at) + wait - now)


def window(now: float, check_interval_s: float) -> int:
    return int(now // max(check_interval_s, 1))


def stale_reason(run: dict[str, Any], lease_holder: str | None, now: float, queue_timeout_s: float) -> str | None:
    """Why a queued/running run is dead (None: it may still be alive)."""
    if run.get("status") == "running":
        if lease_holder is None or not lease_holder.endswith(f":{run['run_id']}"):
            return "lease expired: the worker running it stopped renewing (killed or lost)"
    elif run.get("status") == "queued":
        queued_at = run.get("queued_at") or 0.0
        if now - queued_at > queue_timeout_s:
            return f"not started within training.queue_timeout_s ({queue_timeout_s:.0f}s): its task was lost"
    return None


@dataclass
class CheckResult:
    action: str  # started | skipped
    # a Decision reason, run_in_progress, canary_running, window_taken, backing_off_after_failure or
    # waiting_for_generation
    reason: str
    run_id: str | None = None
    decision: Decision | None = None
    recovered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["decision"] = self.decision.to_dict() if self.decision else None
        return out


class Trigger:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.runs = RunStore(redis, keys, runs_dir=Path(settings.data_dir) / "runs")
        self._claim = redis.register_script(_CLAIM)
        self._fail_stale = redis.register_script(_FAIL_STALE)

    def recover_stale(self, now: float | None = None) -> list[str]:
        """Mark dead queued/running runs failed and free the slot they hold; returns their ids."""
        now = time.time() if now is None else now
        holder = self.redis.get(self.keys.training_lease)
        lease_holder = holder.decode() if isinstance(holder, bytes) else holder
        recovered = []
        candidates = {r["run_id"]: r for r in self.runs.recent(STALE_SCAN) if r.get("status") in ACTIVE}
        current = self.runs.current()
        if current and current not in candidates:
            run = self.runs.get(current)
            if run is None or run.get("status") not in ACTIVE:  # finished but the slot was not released
                self.runs.release_slot(current)
            else:
                candidates[current] = run
        for run_id, run in candidates.items():
            reason = stale_reason(run, lease_holder, now, self.settings.training.queue_timeout_s)
            if reason is None:
                continue
            failed = self._fail_stale(
                keys=[self.keys.run(run_id), self.keys.current_run, self.keys.training_lease],
                args=[run_id, run["status"], repr(now), reason],
            )
            if failed:
                log.warning("training run %s marked failed: %s", run_id, reason)
                metrics.record_training_run("failure")
                recovered.append(run_id)
        return recovered

    def new_pairs(self) -> int:
        from workers.pairing import datasets

        since = self.runs.training_state().get("last_dataset_version") or None
        try:
            return datasets.count_new_pairs(self.redis, self.keys, since)
        except datasets.SnapshotError:  # the version's record is gone: count everything
            return datasets.count_new_pairs(self.redis, self.keys, None)

    def pending_generation(self, now: float) -> int:
        """Generation candidates the due run still waits for (0: start it); the first call marks when it was due."""
        wait_s = self.settings.training.generation_wait_s
        strategies = [s for s in self.settings.pairs.strategies if s in GENERATED_STRATEGIES]
        if wait_s <= 0 or not strategies:
            return 0
        became_due = self.redis.hsetnx(self.keys.training_state, DUE_AT, repr(now))
        due_at = float(self.runs.training_state().get(DUE_AT) or now)
        pipe = self.redis.pipeline(transaction=False)
        for strategy in strategies:
            pipe.zcount(self.keys.pairing_candidates(strategy), "-inf", due_at)
        pending = sum(int(n) for n in pipe.execute())
        if not waits_for_generation(pending, due_at, now, wait_s):
            return 0
        # once per due run at info: the trigger is checked every few seconds while it waits
        log.log(
            logging.INFO if became_due else logging.DEBUG,
            "training is due; waiting %.0fs more at most for %d generated pairs pending since then",
            wait_s - (now - due_at),
            pending,
        )
        return pending

    def evaluate(self, now: float | None = None) -> Decision:
        """The trigger rule on the current data (no side effect but remembering the first check time)."""
        now = time.time() if now is None else now
        self.redis.hsetnx(self.keys.training_state, "first_check_at", repr(now))
        state = self.runs.training_state()
        reference = state.get("last_run_at") or state.get("first_check_at")
        since = now - float(reference) if reference else None
        return decide(self.new_pairs(), since, self.settings.training)

    def check(
        self, enqueue: Callable[[str], None] | None = None, force: bool = False, now: float | None = None
    ) -> CheckResult:
        """Recover stale runs, decide, claim a run atomically and hand its id to ``enqueue``.

        ``force`` (``feedloop train --now``) skips the rule and the window but never the run slot.
        """
        now = time.time() if now is None else now
        recovered = self.recover_stale(now)
        current = self.runs.current()
        if current is not None:
            self.redis.hdel(self.keys.training_state, DUE_AT)  # a check racing the claim may have set it again
            return CheckResult("skipped", "run_in_progress", current, recovered=recovered)
        if not force and self.redis.exists(self.keys.canary_adapter):
            # its candidate could not be promoted (one canary at a time): train once live votes have decided
            return CheckResult("skipped", "canary_running", None, recovered=recovered)
        if not force and (wait := backoff_remaining(self.runs.recent(STALE_SCAN), now, self.settings.training)):
            log.info("training backs off %.0fs more after failed runs", wait)
            return CheckResult("skipped", "backing_off_after_failure", None, recovered=recovered)
        decision = Decision(True, "forced", self.new_pairs(), None) if force else self.evaluate(now)
        if not decision.start:
            self.redis.hdel(self.keys.training_state, DUE_AT)
            return CheckResult("skipped", decision.reason, None, decision, recovered)
        if not force and self.pending_generation(now):
            return CheckResult("skipped", "waiting_for_generation", None, decision, recovered)
        due_at = self.runs.training_state().get(DUE_AT)
        run_id = self.runs.next_run_id()
        interval = self.settings.training.check_interval_s
        record = encode(
            {
                "run_id": run_id,
                "status": "queued",
                "created_at": now,
                "queued_at": now,
                "trigger": {
                    **decision.to_dict(),
                    "waited_for_generation_s": round(now - float(due_at), 1) if due_at and not force else 0.0,
                },
                "method": self.settings.training.method,
            }
        )
        outcome, detail = (
            v.decode() if isinstance(v, bytes) else v
            for v in self._claim(
                keys=[
                    self.keys.current_run,
                    self.keys.trigger_window(window(now, interval)),
                    self.keys.run(run_id),
                    self.keys.runs_index,
                ],
                args=[
                    run_id,
                    0 if force else int(2 * max(interval, 1) * 1000),
                    repr(now),
                    *[item for pair in record.items() for item in pair],
                ],
            )
        )
        if outcome != "claimed":
            return CheckResult("skipped", outcome, detail or None, decision, recovered)
        self.redis.hdel(self.keys.training_state, DUE_AT)
        log.info("training run %s queued (%s, %d new pairs)", run_id, decision.reason, decision.new_pairs)
        if enqueue is not None:
            try:
                enqueue(run_id)
            except Exception as error:
                self.runs.update(run_id, {"status": "failed", "finished_at": time.time(), "error": f"enqueue: {error}"})
                self.runs.release_slot(run_id)
                raise
        return CheckResult("started", decision.reason, run_id, decision, recovered)
