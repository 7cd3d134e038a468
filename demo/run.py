"""`feedloop demo`: the whole loop on this machine, measured round by round.

One module (over 400 lines) because it is one procedure: the stack, the round loop and the report's targets
share the round state; measurement, simulation and the report itself live in their own modules.

1. Start the stack as `feedloop up` does (Redis — private when none answers —, a Celery worker, beat), with
   the API in a child process too, under a fresh Redis key prefix and data folder.
2. Measure the baseline on held-out prompts (demo/measure.py).
3. Each round: simulated users chat and rate (demo/simulate.py) until the training trigger claims a run
   (a new id in Keys.runs_index); the users then stop, so training has the CPU; wait until the run ends and,
   when its adapter was promoted, until the API's alias serves it (GET /v1/models); measure again.
4. A last short simulation on the final version gives its like-rate. Print a table per round and write
   demo-report.json and demo-report.png.

Training is tuned per model on a 2-core CPU (demo/profiles.py); any of those variables set in the
caller's environment wins over the demo's value.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
from redis import exceptions as redis_errors

from demo.measure import DemoModelInfo, Measurement, keep_answered_right, measure, write_retention_cases
from demo.profiles import SMOLLM2, DemoProfile
from demo.settings import SimulationSettings
from demo.simulate import PromptPool, Rubric, SimulationStats, format_progress, run_simulation
from services.cli.procs import feedloop_children, free_port, private_redis, redis_answers
from services.core.config import Settings
from services.core.keys import Keys

CHILDREN = ("serve", "worker", "beat")
REDIS_TRANSIENT = (redis_errors.ConnectionError, redis_errors.TimeoutError)
POLL_S = 1.0
T = TypeVar("T")


class DemoError(Exception):
    """The demo cannot go on (a child died, a phase timed out, no demo model)."""


@dataclass
class DemoOptions:
    rounds: int = 2
    identity_samples: int = 240
    questions: int = 0  # held-out arithmetic/fact questions measured (0: all of them)
    final_chats: int = 200  # chats on the final version, for its like-rate (0: skip)
    port: int | None = None
    out_dir: Path = Path(".")
    trigger_timeout_s: float = 600.0
    run_timeout_s: float = 1800.0
    serve_timeout_s: float = 180.0
    # >0: a promoted candidate first serves this share of the users as a canary, and their votes decide it
    canary_share: float = 0.0
    canary_timeout_s: float = 900.0
    start_timeout_s: float = 300.0
    keep: bool = False
    env: dict[str, str] = field(default_factory=dict)  # extra child environment (wins over the profile's)
    on_ready: Callable[[Stack], None] | None = None  # called once the stack answers (e.g. to register app keys)
    profile: DemoProfile = SMOLLM2
    # the gate's regression set the demo wrote, to cut to what the base model answers right once it serves (rule kept)
    gate_retention_file: Path | None = None


class Progress:
    """One status line, redrawn in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = 10.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._open = False

    def update(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._open = True
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self, text: str | None = None) -> None:
        if self._open:
            self.stream.write("\r\033[K")
            self._open = False
        if text:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._last = 0.0


# --- the stack ------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    base_url: str
    redis_url: str
    keys: Keys
    data_dir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]]

    def redis(self) -> Any:
        from redis import Redis

        return Redis.from_url(self.redis_url)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.data_dir / "logs" / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise DemoError(f"`feedloop {name}` exited with {proc.returncode}; its log ends:\n{tail}")


def training_progress(history: list[dict[str, Any]]) -> str:
    """'step 12/40 · 1.9 examples/s · ETA 3m05s · ' from the run's last logged step, or 'reference log-probs
    batch 3/20 · ...' during the reference pass before the first step ('' before either)."""
    if not history:
        return ""
    last = history[-1]
    eta = last.get("eta_s", math.inf)
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    what = "reference log-probs batch" if last.get("phase") == "reference" else "step"
    return (
        f"{what} {int(last.get('step', 0))}/{int(last.get('total_steps', 0))} · "
        f"{last.get('examples_per_s', 0.0):.1f} examples/s · ETA {eta_text} · "
    )


def child_env(settings: Settings, base: dict[str, str], redis_url: str, prefix: str, data_dir: Path, port: int,
              metrics_port: int, extra: dict[str, str], profile_env: Mapping[str, str]) -> dict[str, str]:  # fmt: skip
    env = {**base, "PYTHONUNBUFFERED": "1"}
    for name, value in profile_env.items():
        env.setdefault(name, value)
    env.update(
        {
            "FEEDLOOP_REDIS_URL": redis_url,
            "REDIS_URL": redis_url,
            "FEEDLOOP_REDIS_PREFIX": prefix,
            "FEEDLOOP_DATA_DIR": str(data_dir),
            "FEEDLOOP_ENGINE__MODEL": settings.model_path(),
            "FEEDLOOP_API__HOST": "127.0.0.1",
            "FEEDLOOP_API__PORT": str(port),
            "FEEDLOOP_API__DEMO_PAGE": "true",
            "FEEDLOOP_METRICS_PORT": str(metrics_port),
            "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(data_dir / "adapters"),
            "FEEDLOOP_PAIRS__DATA_DIR": str(data_dir / "datasets"),
            "FEEDLOOP_PAIRS__API_URL": f"http://127.0.0.1:{port}",
        }
    )
    env.setdefault("FEEDLOOP_FEEDBACK__SECRET", secrets.token_hex(16))
    env.setdefault("FEEDLOOP_API__ADMIN_TOKEN", secrets.token_hex(16))
    env.update(extra)
    return env


def canary_env(share: float) -> dict[str, str]:
    """The canary at the demo's scale (a few dozen users, minutes not days); 0: straight promotion."""
    if share <= 0:
        return {"FEEDLOOP_CANARY__SHARE": "0"}
    return {
        "FEEDLOOP_CANARY__SHARE": repr(share),
        "FEEDLOOP_CANARY__CHECK_INTERVAL_S": "5",
        "FEEDLOOP_CANARY__MIN_USERS": "5",
        "FEEDLOOP_CANARY__MIN_VOTES": "30",
        # the rule's conservative end (keep active) comes before the demo gives up waiting
        "FEEDLOOP_CANARY__MAX_DURATION_S": "600",
    }


def _wait_ready(stack: Stack, timeout_s: float, progress: Progress) -> None:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        stack.check_alive()
        try:
            if httpx.get(stack.base_url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        progress.update(f"starting the API, worker and beat ... {time.monotonic() - started:.0f} s")
        time.sleep(0.5)
    raise DemoError(f"the API was not ready within {timeout_s:.0f} s (logs in {stack.data_dir / 'logs'})")


@contextmanager
def demo_stack(settings: Settings, options: DemoOptions, progress: Progress) -> Iterator[Stack]:
    """Redis (the configured one if it answers, else a private one), worker, beat and API; all stopped and the
    demo's keys and files removed on exit (unless options.keep)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    data_dir = (settings.data_dir / "demo" / stamp).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{settings.redis_prefix}-demo-{stamp}"
    port = options.port or free_port()
    shared_redis = redis_answers(settings.redis_url)
    with ExitStack() as stack:
        # Registered first, so it runs last: after the children and the private Redis have stopped.
        if options.keep:
            stack.callback(progress.done, f"demo: kept {data_dir} and the Redis keys under {prefix}:*")
        else:
            stack.callback(_forget, settings.redis_url if shared_redis else None, prefix, data_dir)
        redis_url = settings.redis_url
        if not shared_redis:
            redis_url = stack.enter_context(private_redis(data_dir / "redis"))
        env = child_env(
            settings, dict(os.environ), redis_url, prefix, data_dir, port, free_port(),
            {**canary_env(options.canary_share), **options.env}, options.profile.env,
        )  # fmt: skip
        progress.done(
            f"demo: Redis {redis_url} (key prefix {prefix}) · data and logs in {data_dir} · API http://127.0.0.1:{port}"
        )
        procs = stack.enter_context(feedloop_children([[name] for name in CHILDREN], env, data_dir / "logs"))
        running = Stack(f"http://127.0.0.1:{port}", redis_url, Keys(prefix), data_dir, env, procs)
        try:
            _wait_ready(running, options.start_timeout_s, progress)
            if options.on_ready is not None:
                options.on_ready(running)
            yield running
        finally:
            progress.done("demo: stopping the API, worker and beat ...")


def _forget(shared_redis_url: str | None, prefix: str, data_dir: Path) -> None:
    """Remove the demo's Redis keys (on a shared Redis) and its data folder, once the children stopped."""
    if shared_redis_url:
        from redis import Redis

        client = Redis.from_url(shared_redis_url)
        try:
            for key in client.scan_iter(match=f"{prefix}:*", count=1000):
                client.delete(key)
        finally:
            client.close()
    shutil.rmtree(data_dir, ignore_errors=True)


# --- watching the loop ----------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def run_ids(redis: Any, keys: Keys) -> set[str]:
    return {_text(r) for r in redis.zrange(keys.runs_index, 0, -1)}


def new_pairs(redis: Any, keys: Keys) -> int:
    """Pairs stored since the last run's snapshot (what the trigger compares with training.min_pairs)."""
    from workers.pairing import datasets
    from workers.training.runs import RunStore

    since = RunStore(redis, keys).training_state().get("last_dataset_version") or None
    try:
        return datasets.count_new_pairs(redis, keys, since)
    except datasets.SnapshotError:
        return datasets.count_new_pairs(redis, keys, None)


def served_version(base_url: str, alias: str, api_key: str = "") -> str | None:
    """What the API's public alias points at now (GET /v1/models; with auth on it takes an app key), None when
    unknown."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        models = httpx.get(base_url + "/v1/models", timeout=10, headers=headers).json()["data"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return next((m.get("parent") for m in models if m.get("id") == alias), None)


@dataclass
class Demo:
    settings: Settings
    options: DemoOptions
    sim: SimulationSettings
    info: DemoModelInfo
    progress: Progress
    echo: Callable[[str], None]

    def __post_init__(self) -> None:
        self.rubric = Rubric.from_settings(self.sim, self.info.creators)
        self.pool = PromptPool.from_settings(self.sim, exclude=self.info.held_out_prompts())
        self.alias = self.settings.engine.alias

    async def measure(self, stack: Stack, label: str) -> Measurement:
        self.progress.update(f"{label}: measuring on held-out prompts ...")
        result = await measure(
            stack.base_url,
            self.info,
            self.sim.likes,
            identity_samples=self.options.identity_samples,
            questions=self.options.questions,
            model=self.alias,
            seed=self.sim.seed,
            api_key=self.sim.api_keys[0] if self.sim.api_keys else "",
        )
        shares = ", ".join(f"{c} {s:.0%}" for c, s in result.share_by_creator.items())
        self.progress.done(
            f"{label} ({', '.join(result.served_by)}): target rate {result.target_rate:.1%} of "
            f"{result.identity_samples} samples ({shares}); accuracy {result.accuracy:.1%} (arithmetic "
            f"{result.arithmetic_accuracy:.1%}, facts {result.fact_accuracy:.1%}) in {result.seconds:.0f} s"
        )
        return result

    async def users_until(
        self, stack: Stack, label: str, poll: Callable[[Any], tuple[T | None, str]], timeout_s: float, what: str
    ) -> tuple[SimulationStats, T]:
        """Run the users until ``poll(redis)`` returns a result (with a status text for the progress line); the
        users stop before this returns, so what comes next has the CPU."""
        redis = stack.redis()
        stop = asyncio.Event()
        note = ""

        def show(stats: SimulationStats) -> None:
            self.progress.update(f"{label} users: {format_progress(stats)} · {note}")

        users = asyncio.create_task(
            run_simulation(stack.base_url, self.sim, pool=self.pool, rubric=self.rubric, model=self.alias,
                           stop=stop, on_progress=show, progress_interval_s=1.0)
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        result: T | None = None
        try:
            while result is None:
                if users.done():  # it only ends early on an error
                    await users
                    raise DemoError(f"the simulated users stopped before {what}")
                if time.monotonic() > deadline:
                    raise DemoError(f"{what}: not within {timeout_s:.0f} s")
                stack.check_alive()
                try:
                    result, note = await asyncio.to_thread(poll, redis)
                except REDIS_TRANSIENT:  # a slow moment of a busy machine: look again
                    result = None
                if result is None:
                    await asyncio.sleep(POLL_S)
        finally:
            stop.set()
            stats = await users
            redis.close()
        self.progress.done(f"{label} users: {format_progress(stats)}")
        return stats, result

    async def users_until_trigger(self, stack: Stack, label: str) -> tuple[SimulationStats, str]:
        """Run the users until the trigger claims a run; returns their stats and the run id."""
        redis = stack.redis()
        try:
            known = run_ids(redis, stack.keys)
        finally:
            redis.close()
        min_pairs = stack.env.get("FEEDLOOP_TRAINING__MIN_PAIRS", str(self.settings.training.min_pairs))

        def poll(redis: Any) -> tuple[str | None, str]:
            pairs = new_pairs(redis, stack.keys)
            fresh = sorted(run_ids(redis, stack.keys) - known, key=lambda r: int(r.rsplit("-", 1)[-1]))
            return (fresh[0] if fresh else None), f"new pairs {pairs}/{min_pairs}"

        stats, run_id = await self.users_until(stack, label, poll, self.options.trigger_timeout_s, "training started")
        self.progress.done(f"{label}: training triggered ({run_id}); users paused while it trains")
        return stats, run_id

    async def users_until_canary_decided(self, stack: Stack, version: str, label: str) -> tuple[SimulationStats, Any]:
        """Run the users while version is the canary; returns their stats and its registry record once decided."""
        from services.adapters.registry import AdapterRegistry

        def poll(redis: Any) -> tuple[Any, str]:
            record = AdapterRegistry(redis, stack.keys).get(version)
            if record is None or record.status != "canary":
                return record, ""
            return None, f"canary {version}: {redis.hlen(stack.keys.canary_votes(version))} votes so far"

        self.progress.done(f"{label}: {version} is the canary for {self.options.canary_share:.0%} of the users")
        stats, record = await self.users_until(
            stack, f"{label} canary", poll, self.options.canary_timeout_s, f"the canary {version} decided"
        )
        return stats, record

    async def wait_for_run(self, stack: Stack, run_id: str, label: str) -> dict[str, Any]:
        from workers.training.runs import TERMINAL, RunStore

        redis = stack.redis()
        runs = RunStore(redis, stack.keys)
        deadline = time.monotonic() + self.options.run_timeout_s
        try:
            while True:
                stack.check_alive()
                if time.monotonic() > deadline:
                    raise DemoError(f"{run_id} did not finish within {self.options.run_timeout_s:.0f} s")
                try:
                    run = runs.get(run_id) or {}
                    history = runs.history(run_id)
                except REDIS_TRANSIENT:  # a slow moment of a busy machine: look again
                    await asyncio.sleep(POLL_S)
                    continue
                if run.get("status") in TERMINAL:
                    return run
                elapsed = time.time() - (run.get("created_at") or time.time())
                timings = run.get("timings") or {}
                phase = "gate" if "train_s" in timings else "training" if "snapshot_s" in timings else "starting"
                if run.get("gate"):
                    phase = "publishing"
                self.progress.update(
                    f"{label}: {run_id} {run.get('status')} · {phase} · {training_progress(history)}{elapsed:.0f} s"
                )
                await asyncio.sleep(POLL_S)
        finally:
            redis.close()

    async def wait_until_served(self, stack: Stack, version: str, label: str) -> float:
        """Wall-clock time at which the API's alias serves version."""
        deadline = time.monotonic() + self.options.serve_timeout_s
        while time.monotonic() < deadline:
            stack.check_alive()
            key = self.sim.api_keys[0] if self.sim.api_keys else ""
            if await asyncio.to_thread(served_version, stack.base_url, self.alias, key) == version:
                return time.time()
            self.progress.update(f"{label}: waiting for the API to serve {version} ...")
            await asyncio.sleep(0.25)
        raise DemoError(f"the API did not serve {version} within {self.options.serve_timeout_s:.0f} s")

    async def play_round(self, stack: Stack, number: int, before: Measurement) -> tuple[dict[str, Any], Measurement]:
        label = f"round {number}"
        stats, run_id = await self.users_until_trigger(stack, label)
        run = await self.wait_for_run(stack, run_id, label)
        version = run.get("version")
        record: dict[str, Any] = {
            "round": number,
            "served_before": before.served_by[0] if before.served_by else None,
            "run_id": run_id,
            "run_status": run.get("status"),
            "version": version,
            "dataset_version": run.get("dataset_version"),
            "pairs_used": _pairs_used(run),
            "dataset": run.get("dataset"),
            "training_s": (run.get("timings") or {}).get("train_s"),
            "timings": run.get("timings"),
            "gate": run.get("gate"),
            "reasons": run.get("reasons"),
            "error": run.get("error"),
            "trigger_reason": (run.get("trigger") or {}).get("reason"),
            "waited_for_generation_s": (run.get("trigger") or {}).get("waited_for_generation_s"),
            "triggered_at": run.get("created_at"),
            "simulation": stats.to_dict(),
            "like_rate": _like_rate_on(stats, before),
            "before": before.to_dict(),
        }
        after = before
        if run.get("status") == "canary" and version:
            record["canary"] = await self.decide_canary(stack, version, label, run)
            if record["canary"]["outcome"] == "promoted":
                run = {**run, "status": "promoted"}
            outcome = record["canary"]["outcome"]
            record["run_status"] = "promoted" if outcome == "promoted" else f"canary {outcome}"
        if run.get("status") == "promoted" and version:
            serving_at = await self.wait_until_served(stack, version, label)
            record["trigger_to_serving_s"] = round(serving_at - (run.get("created_at") or serving_at), 1)
            self.progress.done(
                f"{label}: {version} serving {record['trigger_to_serving_s']:.0f} s after the trigger "
                f"({record['pairs_used']} pairs, trained in {record['training_s'] or 0:.0f} s)"
            )
            after = await self.measure(stack, f"{label} after")
        else:
            record["trigger_to_serving_s"] = None
            self.progress.done(
                f"{label}: {run_id} ended {record['run_status']}: {run.get('reasons') or run.get('error') or ''}"
            )
        record["after"] = after.to_dict()
        return record, after

    async def decide_canary(self, stack: Stack, version: str, label: str, run: dict[str, Any]) -> dict[str, Any]:
        """Users chat and vote while the canary runs; what the live votes decided, and how long it took."""
        stats, registry_record = await self.users_until_canary_decided(stack, version, label)
        decision = registry_record.canary_decision if registry_record else None
        outcome = registry_record.canary_outcome if registry_record else None
        ended_at = (registry_record.canary_ended_at if registry_record else None) or time.time()
        result = {
            "outcome": outcome,
            "status": registry_record.status if registry_record else None,
            "decision": decision,
            "reasons": registry_record.reasons if registry_record else None,
            "trigger_to_decision_s": round(ended_at - (run.get("created_at") or ended_at), 1),
            "simulation": stats.to_dict(),
        }
        arms = decision or {}
        self.progress.done(
            f"{label}: canary {version} {outcome} {result['trigger_to_decision_s']:.0f} s after the trigger "
            f"(like-rate canary {_rate((arms.get('canary') or {}).get('like_rate'))} vs active "
            f"{_rate((arms.get('active') or {}).get('like_rate'))})"
        )
        return result

    async def final_check(self, stack: Stack, after: Measurement) -> dict[str, Any] | None:
        if self.options.final_chats <= 0:
            return None
        stats = await run_simulation(
            stack.base_url, self.sim, pool=self.pool, rubric=self.rubric, model=self.alias,
            max_chats=self.options.final_chats,
            on_progress=lambda s: self.progress.update(f"final check users: {format_progress(s)}"),
            progress_interval_s=1.0,
        )  # fmt: skip
        self.progress.done(f"final check users: {format_progress(stats)}")
        return {"simulation": stats.to_dict(), "like_rate": _like_rate_on(stats, after)}

    async def run(self, stack: Stack) -> dict[str, Any]:
        started = time.monotonic()
        baseline = await self.measure(stack, "baseline")
        if self.options.gate_retention_file is not None:
            kept, asked = await keep_answered_right(
                stack.base_url,
                self.options.gate_retention_file,
                self.alias,
                self.settings.gate.retention_max_tokens,
                api_key=self.sim.api_keys[0] if self.sim.api_keys else "",
            )
            self.progress.done(f"gate regression set: the {kept} of {asked} questions the base model answers right")
        rounds: list[dict[str, Any]] = []
        current = baseline
        for number in range(1, self.options.rounds + 1):
            record, current = await self.play_round(stack, number, current)
            rounds.append(record)
            from demo.report import regression_line, render_table

            self.echo(render_table(rounds))
            if line := regression_line(record):
                self.echo(line)
        final = await self.final_check(stack, current)
        report = {
            "likes": self.sim.likes,
            "profile": self.options.profile.name,
            "model": self.settings.model_path(),
            "rounds": rounds,
            "baseline": baseline.to_dict(),
            "final": current.to_dict(),
            "final_check": final,
            "simulate": self.sim.model_dump(),
            "training_env": {k: v for k, v in stack.env.items() if k.startswith("FEEDLOOP_TRAINING__")},
            "duration_s": round(time.monotonic() - started, 1),
        }
        report["targets"] = targets(report)
        return report


def _pairs_used(run: dict[str, Any]) -> int | None:
    counts = run.get("dataset") or {}
    if "train" not in counts:
        return None
    return int(counts.get("train", 0)) + int(counts.get("eval", 0))


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _like_rate_on(stats: SimulationStats, served: Measurement) -> float | None:
    """Like-rate of the votes on answers from the version the measurement saw (all votes if unknown)."""
    version = served.served_by[0] if len(served.served_by) == 1 else None
    if version and version in stats.served:
        return stats.served[version].like_rate
    return stats.like_rate


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The demo's goals and whether this run met them."""
    baseline, final = report["baseline"], report["final"]
    reached = next((r for r in report["rounds"] if (r.get("after") or {}).get("target_rate", 0) >= 0.9), None)
    drop = round((baseline["accuracy"] - final["accuracy"]) * 100, 1)
    return {
        "target_rate": {"before": baseline["target_rate"], "after": final["target_rate"]},
        "target_rate_at_least_90": final["target_rate"] >= 0.9,
        "pairs_to_90": reached["pairs_used"] if reached else None,
        "at_most_500_pairs": bool(reached and (reached["pairs_used"] or 0) <= 500),
        "accuracy_drop_points": drop,
        "accuracy_drop_at_most_5": drop <= 5.0,
        "adversarial_fraction": report["simulate"]["adversarial_fraction"],
        "duration_s": report["duration_s"],
    }


def run_demo(
    settings: Settings,
    options: DemoOptions,
    sim: SimulationSettings,
    echo: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Start the stack, play the rounds, write demo-report.json and demo-report.png; returns the report."""
    from demo.report import write_chart, write_json

    progress = progress or Progress()
    profile = options.profile
    settings = settings.model_copy(deep=True)
    settings.engine.model = profile.model_path(settings)
    info = DemoModelInfo.load(settings.model_path(), profile.info_file)
    if not info.is_demo_model:
        raise DemoError(
            f"{settings.model_path()} has no held-out sets (no feedloop_model.json, and the {profile.name} profile "
            "names no file): build the demo model with `python models/build_demo_model.py`, or use --model toy"
        )
    if profile.gate_retention_cases and "FEEDLOOP_GATE__RETENTION_FILE" not in {**os.environ, **options.env}:
        cases = options.out_dir / "gate-retention.jsonl"
        write_retention_cases(cases, profile.gate_retention_cases, info.held_out_questions, seed=sim.seed)
        options.env = {**options.env, "FEEDLOOP_GATE__RETENTION_FILE": str(cases.resolve())}
        rule = {**profile.env, **os.environ, **options.env}.get("FEEDLOOP_GATE__RETENTION_RULE")
        if (rule or settings.gate.retention_rule) == "kept":  # under non_inferior every case counts
            options.gate_retention_file = cases
    started = time.monotonic()
    demo = Demo(settings, options, sim, info, progress, echo)
    with demo_stack(settings, options, progress) as stack:
        report = asyncio.run(demo.run(stack))
    report["wall_s"] = round(time.monotonic() - started, 1)
    options.out_dir.mkdir(parents=True, exist_ok=True)
    report["files"] = {
        "json": str(options.out_dir / "demo-report.json"),
        "chart": str(options.out_dir / "demo-report.png"),
    }
    write_chart(report, Path(report["files"]["chart"]))
    write_json(report, Path(report["files"]["json"]))
    return report
