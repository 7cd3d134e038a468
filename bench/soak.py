"""Soak: the whole loop for a long while, sampling the resources that must level off.

    .venv/bin/python bench/soak.py [--minutes 30] [--interval-s 60] [--min-pairs 60] [--max-steps 10]

(`make soak` runs it for 30 minutes; it is not part of `make test`.)

The stack is the demo's (demo/run.py's demo_stack: a private redis-server, the API, a Celery worker and beat
as child processes) on the toy model with the toy profile's training settings (demo/profiles.py), except that
a run triggers at `--min-pairs` new pairs and trains `--max-steps` steps, so training runs and promotions
keep coming (with the defaults, one every 15-20 s on 2 busy cores; a larger `--min-pairs` spaces them out), and
the gate's accuracy bars are off (the soak measures resources across promotions, not learning; the gate's
content checks and smoke test still run). Simulated users (demo/simulate.py) chat and vote for the whole soak.

Every `--interval-s` seconds it samples: RSS of the API process, of vLLM's engine core process(es) (children
of the API) and of the Celery worker (with its children: training runs there); the LoRA adapters loaded in
the engine and its slot limit (the API's /metrics); Redis used_memory and connected_clients (INFO); the
feedback stream's length; training runs and promotions so far (the run records); the pairs stored; and the
users' counts (chats, votes, errors).

Writes bench/results/soak-<stamp>.csv and soak-<stamp>.png, prints a markdown table of the samples and the
verdict of :func:`judge`, the "levels off" rule:

* The samples are cut in thirds; the first third is warm-up. A series levels off when the mean of the last
  third exceeds the mean of the middle third by no more than ``max(max_growth * |middle mean|, floor)``
  (``--max-growth``, 10 % by default; each series has an absolute floor so that noise on small values, one
  more Redis client or a 10 MB allocator step, is not called growth).
* The LoRA adapters loaded are bounded when they never exceed the engine's slot limit.
* Redis memory grows by design while votes, pairs and interaction records are within their retention
  windows (days; bench/redis_memory.py measures the steady state): the soak judges its growth per chat,
  ``(used_memory - used_memory at the first sample) / (chats since the first sample)``, which levels off
  when memory is linear in what is retained and grows when something else leaks.

Exit status 0 when every series levels off, 1 when one grows, 2 when the stack failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness

MB = 1024 * 1024


# --- the "levels off" judgement (pure) -------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One sampled column and how it is judged."""

    column: str
    label: str
    floor: float  # growth at or below this absolute amount is never called growth
    cap_column: str | None = None  # bounded when no sample exceeds this column's value


# What the soak judges; the CSV has more columns (counts that are meant to grow: chats, votes, runs).
SERIES: tuple[Series, ...] = (
    Series("api_rss_mb", "API RSS (MB)", floor=16.0),
    Series("engine_rss_mb", "engine core RSS (MB)", floor=16.0),
    Series("worker_rss_mb", "worker RSS (MB)", floor=32.0),
    Series("lora_loaded", "LoRA adapters loaded", floor=0.0, cap_column="lora_slots_max"),
    Series("redis_clients", "Redis connected_clients", floor=2.0),
    Series("stream_len", "feedback stream length", floor=1000.0),
    Series("redis_bytes_per_chat", "Redis bytes per chat", floor=256.0),
    Series("redis_used_mb", "Redis used_memory (MB)", floor=math.inf),  # reported; judged per chat above
)


@dataclass(frozen=True)
class Verdict:
    series: Series
    middle: float | None  # mean of the middle third
    last: float | None  # mean of the last third
    allowed: float | None  # largest growth that still levels off
    ok: bool
    note: str

    @property
    def growth(self) -> float | None:
        return None if self.middle is None or self.last is None else self.last - self.middle

    def row(self) -> list[str]:
        def fmt(value: float | None) -> str:
            return "-" if value is None or math.isnan(value) else f"{value:,.1f}"

        growth = self.growth
        relative = "-"
        if growth is not None and self.middle:
            relative = f"{growth / abs(self.middle):+.1%}"
        return [
            self.series.label,
            fmt(self.middle),
            fmt(self.last),
            "-" if growth is None else f"{growth:+,.1f} ({relative})",
            "-" if self.allowed is None and self.ok else "yes" if self.ok else "**no**",
            self.note,
        ]


def thirds(values: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
    """The samples cut in three: warm-up, middle, last (the last third gets the remainder)."""
    n = len(values)
    return list(values[: n // 3]), list(values[n // 3 : 2 * n // 3]), list(values[2 * n // 3 :])


def _mean(values: Sequence[float]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def judge_series(series: Series, samples: Sequence[Mapping[str, Any]], max_growth: float) -> Verdict:
    """Does one series level off over the samples (oldest first)? See the module's docstring for the rule."""
    values = [_number(s.get(series.column)) for s in samples]
    _, middle, last = thirds(values)
    mid, end = _mean(middle), _mean(last)
    if series.cap_column is not None:
        caps = [_number(s.get(series.cap_column)) for s in samples]
        cap = min((c for c in caps if not math.isnan(c)), default=math.nan)
        seen = [v for v in values if not math.isnan(v)]
        if not seen or math.isnan(cap):
            return Verdict(series, mid, end, None, True, "not measured")
        top = max(seen)
        return Verdict(series, mid, end, cap, top <= cap, f"max {top:g} of {cap:g} slots")
    if mid is None or end is None or len(values) < 3:
        return Verdict(series, mid, end, None, True, "too few samples")
    if math.isinf(series.floor):
        return Verdict(series, mid, end, None, True, "reported, not judged")
    allowed = max(max_growth * abs(mid), series.floor)
    growth = end - mid
    if growth <= allowed:
        return Verdict(series, mid, end, allowed, True, f"levels off (allowed +{allowed:,.1f})")
    return Verdict(series, mid, end, allowed, False, f"grows: +{growth:,.1f} > allowed +{allowed:,.1f}")


def judge(
    samples: Sequence[Mapping[str, Any]], max_growth: float = 0.10, series: Sequence[Series] = SERIES
) -> list[Verdict]:
    """The verdict for every judged series (samples oldest first, each a dict of CSV columns)."""
    return [judge_series(s, samples, max_growth) for s in series]


def with_bytes_per_chat(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Adds redis_bytes_per_chat: Redis memory added per chat since the first sample (NaN before any chat)."""
    if not samples:
        return []
    first = samples[0]
    out = []
    for sample in samples:
        chats = _number(sample.get("chats")) - _number(first.get("chats"))
        grown = (_number(sample.get("redis_used_mb")) - _number(first.get("redis_used_mb"))) * MB
        out.append({**sample, "redis_bytes_per_chat": grown / chats if chats > 0 else math.nan})
    return out


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --- output -----------------------------------------------------------------------------------------------------

COLUMNS = (
    "minute",
    "time",
    "elapsed_s",
    "api_rss_mb",
    "engine_rss_mb",
    "engine_processes",
    "worker_rss_mb",
    "lora_loaded",
    "lora_slots_max",
    "redis_used_mb",
    "redis_clients",
    "stream_len",
    "runs",
    "promotions",
    "serving",
    "chats",
    "votes",
    "pairs",
    "errors",
    "redis_bytes_per_chat",
)
TABLE = (
    ("min", "minute"),
    ("API RSS MB", "api_rss_mb"),
    ("engine RSS MB", "engine_rss_mb"),
    ("worker RSS MB", "worker_rss_mb"),
    ("LoRA loaded/slots", None),
    ("Redis MB", "redis_used_mb"),
    ("Redis clients", "redis_clients"),
    ("stream len", "stream_len"),
    ("runs", "runs"),
    ("promotions", "promotions"),
    ("serving", "serving"),
    ("chats", "chats"),
    ("votes", "votes"),
    ("pairs", "pairs"),
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.1f}"
    return "-" if value is None or value == "" else str(value)


def samples_table(samples: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for s in samples:
        row = []
        for _, column in TABLE:
            if column is None:
                row.append(f"{_cell(s.get('lora_loaded'))}/{_cell(s.get('lora_slots_max'))}")
            else:
                row.append(_cell(s.get(column)))
        rows.append(row)
    return harness.markdown_table([h for h, _ in TABLE], rows)


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    header = ["series", "mean, middle third", "mean, last third", "growth", "levels off", "note"]
    return harness.markdown_table(header, [v.row() for v in verdicts])


def write_csv(samples: Sequence[Mapping[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for s in samples:
            writer.writerow({k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()})


def write_plot(samples: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [_number(s["elapsed_s"]) / 60 for s in samples]
    panels = (
        ("RSS (MB)", (("api_rss_mb", "API"), ("engine_rss_mb", "engine core"), ("worker_rss_mb", "worker"))),
        ("Redis", (("redis_used_mb", "used_memory (MB)"), ("redis_clients", "connected_clients"))),
        ("LoRA and training", (("lora_loaded", "loaded"), ("lora_slots_max", "slots"), ("promotions", "promoted"))),
        ("feedback stream", (("stream_len", "entries"),)),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True)
    for ax, (name, lines) in zip(axes, panels, strict=True):
        for column, label in lines:
            ax.plot(minutes, [_number(s.get(column)) for s in samples], marker="o", markersize=3, label=label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        if len(minutes) >= 3:
            n = len(minutes)
            for cut in (n // 3, 2 * n // 3):
                ax.axvline(minutes[cut], color="grey", linestyle=":", linewidth=1)
    axes[-1].set_xlabel("minutes (dotted: the thirds the verdict compares)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


# --- sampling -----------------------------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> tuple[float, list[Any]]:
    """RSS of a process and of its children (MB), and the psutil children."""
    import psutil

    try:
        proc = psutil.Process(pid)
        children = proc.children(recursive=True)
        total = proc.memory_info().rss
    except psutil.NoSuchProcess:
        return math.nan, []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += child.memory_info().rss
    return total / MB, children


def is_engine_core(proc: Any) -> bool:
    """vLLM's engine core names itself VLLM::EngineCore (setproctitle)."""
    import psutil

    try:
        return "EngineCore" in proc.name() or "EngineCore" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def api_rss(api_pid: int) -> tuple[float, float, int]:
    """RSS of the API process alone, of its engine core process(es) with their children, and how many engine
    core processes there are (MB, MB, count)."""
    import psutil

    try:
        api = psutil.Process(api_pid)
        own = api.memory_info().rss / MB
        children = api.children(recursive=True)
    except psutil.NoSuchProcess:
        return math.nan, math.nan, 0
    cores = [c for c in children if is_engine_core(c)]
    engine = 0.0
    for core in cores:
        rss, _ = tree_rss_mb(core.pid)
        engine += 0 if math.isnan(rss) else rss
    return own, (engine if cores else math.nan), len(cores)


def metric_value(text: str, name: str) -> float:
    """The value of an unlabelled sample in Prometheus' text format (NaN when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            try:
                return float(line.rsplit(" ", 1)[1])
            except ValueError:
                return math.nan
    return math.nan


@dataclass
class Soak:
    stack: Any  # demo.run.Stack
    alias: str
    started: float = field(default_factory=time.monotonic)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def sample(self, stats: Any) -> dict[str, Any]:
        """One row of measurements (blocking: run it in a thread)."""
        import httpx

        from demo.run import REDIS_TRANSIENT, run_ids, served_version
        from services.core import metrics
        from workers.training.runs import RunStore

        stack = self.stack
        api_own, engine, cores = api_rss(stack.procs["serve"].pid)
        worker, _ = tree_rss_mb(stack.procs["worker"].pid)
        try:
            text = httpx.get(stack.base_url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        row: dict[str, Any] = {
            "minute": len(self.samples),
            "time": round(time.time(), 1),
            "elapsed_s": round(time.monotonic() - self.started, 1),
            "api_rss_mb": api_own,
            "engine_rss_mb": engine,
            "engine_processes": cores,
            "worker_rss_mb": worker,
            "lora_loaded": metric_value(text, metrics.ENGINE_LORA_SLOTS_USED),
            "lora_slots_max": metric_value(text, metrics.ENGINE_LORA_SLOTS_MAX),
            "serving": served_version(stack.base_url, self.alias) or "",
            "chats": stats.chats if stats else 0,
            "votes": stats.votes if stats else 0,
            "errors": (stats.chat_errors + stats.vote_errors) if stats else 0,
        }
        redis = stack.redis()
        try:
            info = redis.info()
            row["redis_used_mb"] = int(info["used_memory"]) / MB
            row["redis_clients"] = int(info["connected_clients"])
            row["stream_len"] = int(redis.xlen(stack.keys.feedback_stream))
            row["pairs"] = int(redis.zcard(stack.keys.pairs_index))
            runs = RunStore(redis, stack.keys)
            records = [runs.get(r) or {} for r in run_ids(redis, stack.keys)]
            row["runs"] = len(records)
            row["promotions"] = sum(1 for r in records if r.get("status") == "promoted")
        except REDIS_TRANSIENT:
            pass
        finally:
            redis.close()
        return row


def describe(row: Mapping[str, Any]) -> str:
    return (
        f"API {_cell(row.get('api_rss_mb'))} MB · engine {_cell(row.get('engine_rss_mb'))} MB · "
        f"worker {_cell(row.get('worker_rss_mb'))} MB · LoRA {_cell(row.get('lora_loaded'))}/"
        f"{_cell(row.get('lora_slots_max'))} · Redis {_cell(row.get('redis_used_mb'))} MB, "
        f"{_cell(row.get('redis_clients'))} clients · stream {_cell(row.get('stream_len'))} · pairs "
        f"{_cell(row.get('pairs'))} · runs "
        f"{_cell(row.get('runs'))}, promoted {_cell(row.get('promotions'))} · serving {_cell(row.get('serving'))}"
    )


async def soak(stack: Any, args: argparse.Namespace, sim: Any, info: Any, alias: str, progress: Any) -> Soak:
    from demo.simulate import PromptPool, Rubric, SimulationStats, format_progress, run_simulation

    state = Soak(stack, alias)
    stop = asyncio.Event()
    latest: list[SimulationStats] = []
    duration = args.minutes * 60

    def show(stats: SimulationStats) -> None:
        latest[:] = [stats]
        elapsed = time.monotonic() - state.started
        progress.update(
            f"soak {format_clock(elapsed)} / {format_clock(duration)} (ETA {format_clock(duration - elapsed)}) · "
            f"users: {format_progress(stats)}"
        )

    users = asyncio.create_task(
        run_simulation(stack.base_url, sim, pool=PromptPool.from_settings(sim, exclude=info.held_out_prompts()),
                       rubric=Rubric.from_settings(sim, info.creators), model=alias, stop=stop, on_progress=show,
                       progress_interval_s=5.0, user_prefix="soak-user-")
    )  # fmt: skip
    try:
        next_at = state.started
        while True:
            stack.check_alive()
            if users.done():  # the users only stop early on an error
                await users
                raise RuntimeError("the simulated users stopped before the soak's end")
            row = await asyncio.to_thread(state.sample, latest[0] if latest else None)
            state.samples.append(row)
            # written after every sample, so an interrupted soak keeps what it measured
            await asyncio.to_thread(write_csv, with_bytes_per_chat(state.samples), args.csv_path)
            elapsed = time.monotonic() - state.started
            progress.done(
                f"[soak {format_clock(elapsed)} elapsed, ETA {format_clock(duration - elapsed)}] "
                f"sample {row['minute']}: {describe(row)}"
            )
            next_at += args.interval_s
            if next_at - state.started > duration + 1:
                break
            while time.monotonic() < next_at:
                stack.check_alive()
                await asyncio.sleep(min(2.0, max(0.0, next_at - time.monotonic())))
    finally:
        stop.set()
        stats = await users
        progress.done(f"soak users: {format_progress(stats)}")
    return state


# --- the command ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/soak.py",
        description="Soak: the whole loop on the toy model (chat, feedback, training, promotions) for --minutes, "
        "sampling RSS, LoRA adapters loaded, Redis memory and clients, the feedback stream and promotions; "
        "judges whether each levels off.",
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="How long to soak (default 30).")
    parser.add_argument("--interval-s", type=float, default=60.0, help="Seconds between samples (default 60).")
    parser.add_argument("--min-pairs", type=int, default=60, help="New pairs that trigger a run (default 60).")
    parser.add_argument("--max-steps", type=int, default=10, help="Optimizer steps per run (default 10).")
    parser.add_argument("--users", type=int, default=8, help="Simulated users chatting at once (default 8).")
    parser.add_argument(
        "--think-time-s", type=float, default=0.5, help="Mean pause of a user between chats (default 0.5)."
    )
    parser.add_argument(
        "--max-growth", type=float, default=0.10, help="Growth (last third over middle third) still level."
    )
    parser.add_argument("--out", type=Path, default=harness.RESULTS, help="Folder for the CSV and the PNG.")
    parser.add_argument("--keep", action="store_true", help="Keep the soak's data folder and logs.")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.interval_s <= 0:
        parser.error("--minutes and --interval-s must be positive")
    return args


def soak_env(args: argparse.Namespace) -> dict[str, str]:
    """What the soak sets over the toy profile: a run (and a promotion) every few minutes."""
    return {
        "FEEDLOOP_TRAINING__MIN_PAIRS": str(args.min_pairs),
        "FEEDLOOP_TRAINING__MIN_PAIRS_FLOOR": str(args.min_pairs),
        "FEEDLOOP_TRAINING__MAX_STEPS": str(args.max_steps),
        "FEEDLOOP_TRAINING__CPU_THREADS": "1",
        "FEEDLOOP_GATE__MIN_ACCURACY": "0",
        "FEEDLOOP_GATE__COMPARE_TO_ACTIVE": "off",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from demo.cli import simulation_settings
    from demo.measure import DemoModelInfo
    from demo.profiles import TOY
    from demo.run import DemoError, DemoOptions, Progress, demo_stack
    from services.cli.procs import free_port
    from services.core.config import get_settings

    harness.install_cleanup()
    settings = get_settings().model_copy(deep=True)
    settings.engine.model = TOY.model_path(settings)
    # A Redis URL nothing answers: demo_stack then starts a private redis-server, so the Redis figures (memory,
    # clients) are the soak's alone, not those of whatever else shares the configured Redis.
    settings.redis_url = f"redis://127.0.0.1:{free_port()}/0"
    info = DemoModelInfo.load(settings.model_path(), TOY.info_file)
    sim = simulation_settings(TOY.simulate, users=args.users, think_time_s=args.think_time_s)
    options = DemoOptions(profile=TOY, env=soak_env(args), keep=args.keep, start_timeout_s=600.0)
    progress = Progress(every_s=30.0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.csv_path = args.out / f"soak-{stamp}.csv"
    started, load_start = time.time(), harness.load_average()
    print(
        f"soak: {args.minutes:g} min on {settings.model_path()}, a sample every {args.interval_s:g} s; "
        f"{args.users} users; training at {args.min_pairs} new pairs, {args.max_steps} steps; load {load_start}",
        flush=True,
    )
    try:
        with demo_stack(settings, options, progress) as stack:
            state = asyncio.run(soak(stack, args, sim, info, settings.engine.alias, progress))
    except (DemoError, RuntimeError) as error:
        print(f"soak: failed: {error}", file=sys.stderr)
        return 2
    samples = with_bytes_per_chat(state.samples)
    verdicts = judge(samples, args.max_growth)
    csv_path = args.csv_path
    png_path = args.out / f"soak-{stamp}.png"
    write_csv(samples, csv_path)
    title = (
        f"feedloop soak, {args.minutes:g} min on the toy model ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))}"
        f" UTC, load {load_start[0]:g} on {harness.machine()['cpus']} CPUs)"
    )
    write_plot(samples, png_path, title)
    print()
    print(samples_table(samples))
    print()
    print(
        f"Levels off? The samples in thirds (the first is warm-up); a series levels off when the mean of the last "
        f"third exceeds the middle third's by at most max({args.max_growth:.0%} of it, the series' floor); LoRA "
        f"adapters loaded must stay within the engine's slots; Redis memory is judged per chat."
    )
    print()
    print(verdict_table(verdicts))
    print()
    print(f"load average {load_start} -> {harness.load_average()}; wrote {csv_path} and {png_path}")
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
