"""Feedback ingestion: POST /v1/feedback throughput and latency against the framework's ceiling.

    .venv/bin/python bench/feedback_ingest.py [--levels 1,8,32,128] [--seconds 3] [--rate 1000]

Two servers run side by side in this one run:
  * `feedloop serve` on the tiny model (interaction log and feedback store on the local Redis under a
    throw-away key prefix, rate limits raised so that every vote is accepted);
  * the ceiling: a FastAPI app with one POST route that parses the same request model
    (services.api.schemas.FeedbackRequest) and returns 202, served by uvicorn with the options `feedloop
    serve` uses (same loop, HTTP parser, log level, no access log, keep-alive).

First N completions (max_tokens 1, a distinct `user` each) are created through the chat API, then votes
on them are sent, cycling through the completions and alternating like/dislike, so every vote is a real
write (token check, interaction lookup, one Lua script: rate-limit buckets, vote hash, history, stream).

Closed loop: at each concurrency level, `c` keep-alive connections each send a vote as soon as the last
one was answered, for --seconds, in F C C F order (F = feedback, C = ceiling) so drift hits both.
Open loop: votes are scheduled at a fixed rate (--rate) and latency is measured from the scheduled send
time, so queueing behind a slow response counts (no coordinated omission).

The client is a minimal HTTP/1.1 client (bench/rawhttp.py) sending pre-encoded requests. Writes
bench/results/feedback_ingest.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.rawhttp import Connection, post
from services.api.schemas import FeedbackRequest

HOST = "127.0.0.1"
FEEDBACK, CEILING = "feedback", "ceiling"
NO_LIMIT = "1000000"


# ---- the ceiling server ---------------------------------------------------------------------------
def serve_ceiling(port: int) -> None:
    """One POST route parsing the feedback body, served with `feedloop serve`'s uvicorn options."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import ORJSONResponse

    from services.core.config import get_settings

    app = FastAPI(default_response_class=ORJSONResponse)

    @app.post("/v1/feedback", status_code=202)
    async def feedback(body: FeedbackRequest) -> ORJSONResponse:
        return ORJSONResponse(
            {"completion_id": body.completion_id, "rating": body.rating, "status": "recorded"}, status_code=202
        )

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    settings = get_settings()
    uvicorn.run(  # the same options as services/cli/main.py _run_api
        app,
        host=HOST,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.api.keep_alive_s,
    )


# ---- votes ----------------------------------------------------------------------------------------
class VotePlan:
    """Pre-encoded votes: vote k goes to completion k mod N, like on even passes and dislike on odd ones,
    so a completion's successive votes always change it (as long as fewer than N are in flight)."""

    def __init__(self, completions: list[tuple[str, str, str]], port: int):
        self.requests: list[tuple[bytes, bytes]] = []
        for completion_id, token, user in completions:
            pair = []
            for rating in ("like", "dislike"):
                body = json.dumps(
                    {"completion_id": completion_id, "token": token, "rating": rating, "user": user}
                ).encode()
                pair.append(post(HOST, port, "/v1/feedback", body))
            self.requests.append((pair[0], pair[1]))
        self.k = 0

    def next(self) -> bytes:
        n = len(self.requests)
        raw = self.requests[self.k % n][(self.k // n) % 2]
        self.k += 1
        return raw


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    client_lag: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0

    def count(self, status: int, body: bytes) -> None:
        key = str(status)
        if status == 202:
            key = "recorded" if b'"recorded"' in body else "unchanged" if b'"unchanged"' in body else "202"
        self.statuses[key] = self.statuses.get(key, 0) + 1

    def merge(self, other: Tally) -> None:
        self.latencies += other.latencies
        self.client_lag += other.client_lag
        for k, v in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v
        self.wall_s += other.wall_s
        self.server_cpu_s += other.server_cpu_s
        self.redis_cpu_s += other.redis_cpu_s

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        ok = self.statuses.get("recorded", 0) + self.statuses.get("unchanged", 0)
        return {
            "requests": n,
            "statuses": dict(sorted(self.statuses.items())),
            "requests_per_s": round(n / self.wall_s, 1) if self.wall_s else 0.0,
            "p50_ms": round(harness.percentile(self.latencies, 50) * 1000, 3),
            "p99_ms": round(harness.percentile(self.latencies, 99) * 1000, 3),
            "p999_ms": round(harness.percentile(self.latencies, 99.9) * 1000, 3),
            "max_ms": round(max(self.latencies, default=float("nan")) * 1000, 3),
            "client_lag_p99_ms": round(harness.percentile(self.client_lag, 99) * 1000, 3) if self.client_lag else None,
            "server_cpu_us_per_request": round(self.server_cpu_s / max(1, n) * 1e6, 1),
            "redis_cpu_us_per_request": round(self.redis_cpu_s / max(1, n) * 1e6, 1),
            "all_accepted": ok == n,
        }


# ---- measurement ----------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    server: harness.Server
    plan: VotePlan


def cpu_seconds(pid: int) -> float:
    """CPU time of the server process itself (not the idle engine-core children of `feedloop serve`)."""
    import psutil

    return float(sum(psutil.Process(pid).cpu_times()[:2]))


class RedisCpu:
    """Redis server CPU seconds from INFO (server-wide: other clients add to it)."""

    def __init__(self, url: str):
        import redis

        self.client = redis.Redis.from_url(url)

    def seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def open_connections(port: int, n: int) -> list[Connection]:
    return list(await asyncio.gather(*(Connection.open(HOST, port) for _ in range(n))))


async def closed_loop(target: Target, concurrency: int, seconds: float) -> Tally:
    conns = await open_connections(target.server.port, concurrency)
    tally = Tally()
    deadline = time.perf_counter() + seconds

    async def worker(conn: Connection) -> None:
        while time.perf_counter() < deadline:
            raw = target.plan.next()
            sent = time.perf_counter()
            status, body = await conn.request(raw)
            tally.latencies.append(time.perf_counter() - sent)
            tally.count(status, body)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    tally.wall_s = time.perf_counter() - start
    for c in conns:
        c.close()
    return tally


async def open_loop(target: Target, rate: float, seconds: float, pool_size: int) -> Tally:
    conns = await open_connections(target.server.port, pool_size)
    idle: asyncio.Queue[Connection] = asyncio.Queue()
    for c in conns:
        idle.put_nowait(c)
    tally = Tally()
    total = int(rate * seconds)
    loop = asyncio.get_running_loop()

    async def fire(scheduled: float) -> None:
        tally.client_lag.append(time.perf_counter() - scheduled)
        conn = await idle.get()  # waiting for a free connection is queueing: it counts
        status, body = await conn.request(target.plan.next())
        tally.latencies.append(time.perf_counter() - scheduled)
        tally.count(status, body)
        idle.put_nowait(conn)

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.05
    i = 0
    while i < total:
        now = time.perf_counter()
        while i < total and start + i / rate <= now:
            task = loop.create_task(fire(start + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        if i < total:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
    while tasks:
        await asyncio.gather(*list(tasks))
    tally.wall_s = time.perf_counter() - start
    for c in conns:
        c.close()
    return tally


async def measured(coro_factory: Any, target: Target, redis_cpu: RedisCpu) -> Tally:
    cpu0, r0 = cpu_seconds(target.server.proc.pid), redis_cpu.seconds()
    tally: Tally = await coro_factory()
    tally.server_cpu_s = cpu_seconds(target.server.proc.pid) - cpu0
    tally.redis_cpu_s = redis_cpu.seconds() - r0
    return tally


async def create_completions(port: int, n: int, model: str, concurrency: int = 64) -> list[tuple[str, str, str]]:
    """n completions (max_tokens 1), each for a distinct user: (completion id, feedback token, user)."""
    conns = await open_connections(port, concurrency)
    made: list[tuple[str, str, str]] = []
    next_index = 0

    async def worker(conn: Connection) -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            user = f"bench-user-{i}"
            body = json.dumps(
                {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Question {i}: what is two plus two?"}],
                    "max_tokens": 1,
                    "user": user,
                }
            ).encode()
            status, raw = await conn.request(post(HOST, port, "/v1/chat/completions", body))
            if status != 200:
                raise RuntimeError(f"creating a completion failed: HTTP {status} {raw[:300]!r}")
            fb = json.loads(raw)["feedback"]
            made.append((fb["completion_id"], fb["token"], user))

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()
    return made


def fmt(tally: dict[str, Any]) -> str:
    return f"{tally['requests_per_s']:8.0f} req/s p50 {tally['p50_ms']:6.2f} ms p99 {tally['p99_ms']:7.2f} ms"


async def run(args: argparse.Namespace, ours: harness.Server, ceiling: harness.Server, prefix: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    completions = await create_completions(ours.port, args.completions, "feedloop")
    print(f"created {len(completions)} completions in {time.perf_counter() - t0:.1f}s", flush=True)
    targets = {
        FEEDBACK: Target(FEEDBACK, ours, VotePlan(completions, ours.port)),
        CEILING: Target(CEILING, ceiling, VotePlan(completions, ceiling.port)),
    }
    redis_cpu = RedisCpu(args.redis_url)
    for name in (FEEDBACK, CEILING):  # warm-up: connections, code paths, Lua script cache
        await closed_loop(targets[name], 8, 1.0)
    order = [FEEDBACK, CEILING, CEILING, FEEDBACK]
    closed: list[dict[str, Any]] = []
    for c in args.levels:
        per: dict[str, Tally] = {FEEDBACK: Tally(), CEILING: Tally()}
        for name in order:
            t = targets[name]
            tally = await measured(lambda t=t, c=c: closed_loop(t, c, args.seconds / 2), t, redis_cpu)
            per[name].merge(tally)
            print(f"closed loop c={c:4d} {name:8s} {fmt(tally.summary())}", flush=True)
        f, k = per[FEEDBACK].summary(), per[CEILING].summary()
        closed.append(
            {
                "concurrency": c,
                FEEDBACK: f,
                CEILING: k,
                "throughput_ratio": round(f["requests_per_s"] / k["requests_per_s"], 3),
            }
        )
    opened: list[dict[str, Any]] = []
    for rate in args.rates:
        per = {FEEDBACK: Tally(), CEILING: Tally()}
        for name in order:
            t = targets[name]
            tally = await measured(
                lambda t=t, rate=rate: open_loop(t, rate, args.open_seconds / 2, args.pool), t, redis_cpu
            )
            per[name].merge(tally)
            s = tally.summary()
            print(
                f"open loop {rate:5.0f}/s {name:8s} {fmt(s)} p99.9 {s['p999_ms']:7.2f} ms "
                f"client lag p99 {s['client_lag_p99_ms']:.2f} ms",
                flush=True,
            )
        opened.append(
            {
                "offered_requests_per_s": rate,
                "seconds_per_server": args.open_seconds,
                "connections": args.pool,
                FEEDBACK: per[FEEDBACK].summary(),
                CEILING: per[CEILING].summary(),
            }
        )
    return {
        "closed_loop": closed,
        "open_loop": opened,
        "completions": len(completions),
        "votes_sent": targets[FEEDBACK].plan.k,
    }


def tables(result: dict[str, Any]) -> str:
    closed_rows = [
        [
            r["concurrency"],
            f"{r[FEEDBACK]['requests_per_s']:.0f}",
            f"{r[FEEDBACK]['p50_ms']:.2f}",
            f"{r[FEEDBACK]['p99_ms']:.2f}",
            f"{r[CEILING]['requests_per_s']:.0f}",
            f"{r[CEILING]['p50_ms']:.2f}",
            f"{r[CEILING]['p99_ms']:.2f}",
            f"{r['throughput_ratio']:.2f}",
        ]
        for r in result["closed_loop"]
    ]
    closed = harness.markdown_table(
        [
            "concurrency",
            "feedback req/s",
            "feedback p50 (ms)",
            "feedback p99 (ms)",
            "ceiling req/s",
            "ceiling p50 (ms)",
            "ceiling p99 (ms)",
            "feedback/ceiling",
        ],
        closed_rows,
    )
    open_rows = [
        [
            label,
            f"{o['offered_requests_per_s']:.0f}",
            f"{o[key]['requests_per_s']:.0f}",
            f"{o[key]['p50_ms']:.2f}",
            f"{o[key]['p99_ms']:.2f}",
            f"{o[key]['p999_ms']:.2f}",
            f"{o[key]['max_ms']:.2f}",
            f"{o[key]['client_lag_p99_ms']:.2f}",
        ]
        for o in result["open_loop"]
        for label, key in (("POST /v1/feedback", FEEDBACK), ("ceiling (bare FastAPI route)", CEILING))
    ]
    opened = harness.markdown_table(
        [
            "server",
            "offered req/s",
            "achieved req/s",
            "p50 (ms)",
            "p99 (ms)",
            "p99.9 (ms)",
            "max (ms)",
            "client lag p99 (ms)",
        ],
        open_rows,
    )
    return f"Closed loop (keep-alive connections = concurrency):\n\n{closed}\n\nOpen loop:\n\n{opened}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,32,128", help="closed-loop concurrency levels")
    parser.add_argument("--seconds", type=float, default=4.0, help="closed-loop seconds per server per level")
    parser.add_argument(
        "--rates", default="1000,250", help="open-loop offered requests/s (the target is p99 at 1000/s)"
    )
    parser.add_argument("--open-seconds", type=float, default=10.0, help="open-loop seconds per server")
    parser.add_argument("--pool", type=int, default=128, help="open-loop connections")
    parser.add_argument("--completions", type=int, default=1024)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--output", type=Path, default=harness.RESULTS / "feedback_ingest.json")
    parser.add_argument("--serve-ceiling", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_ceiling:
        serve_ceiling(args.serve_ceiling)
        return
    args.levels = [int(x) for x in args.levels.split(",")]
    args.rates = [float(x) for x in args.rates.split(",")]
    if max([*args.levels, args.pool]) >= args.completions:
        parser.error("--completions must exceed the largest concurrency (votes would repeat in flight)")

    harness.install_cleanup()
    started = time.time()
    load_start = harness.load_average()
    prefix = f"flbench-fb-{uuid.uuid4().hex[:8]}"
    model = str(harness.tiny_model())
    env = {
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "1024",
        "FEEDLOOP_FEEDBACK__RATE_PER_USER": NO_LIMIT,
        "FEEDLOOP_FEEDBACK__BURST_PER_USER": NO_LIMIT,
        "FEEDLOOP_FEEDBACK__RATE_PER_IP": NO_LIMIT,
        "FEEDLOOP_FEEDBACK__BURST_PER_IP": NO_LIMIT,
    }
    ours = harness.feedloop_server("feedback-feedloop", redis_url=args.redis_url, prefix=prefix, model=model, env=env)
    ceiling_port = harness.free_port()
    ceiling = harness.Server(
        "feedback-ceiling",
        [sys.executable, str(Path(__file__)), "--serve-ceiling", str(ceiling_port)],
        {},
        ceiling_port,
    )
    print(f"starting feedloop serve on :{ours.port} and the ceiling app on :{ceiling_port}", flush=True)
    try:
        ceiling.wait_ready("/healthz", timeout=60)
        ours.wait_ready("/readyz")
        import uvloop

        measured_result = uvloop.run(run(args, ours, ceiling, prefix))
    finally:
        ours.stop()
        ceiling.stop()
        deleted = harness.delete_prefix(args.redis_url, prefix)
    closed = measured_result["closed_loop"]
    best_ratio = min(r["throughput_ratio"] for r in closed)
    at_1000 = next((o for o in measured_result["open_loop"] if o["offered_requests_per_s"] == 1000), None)
    result = {
        **harness.result_header("feedback_ingest", started, load_start),
        "server_options": "uvicorn, loop auto (uvloop), http auto (httptools), log_level info, no access log, "
        "keep-alive 75 s, one worker; feedback: the full feedloop app (middlewares, deps, Redis)",
        "redis": {"url": args.redis_url, "keys_written_and_deleted": deleted},
        **measured_result,
        "targets": {
            "throughput_at_least_half_of_ceiling_at_every_level": best_ratio >= 0.5,
            "p99_at_most_10ms_at_1000_per_s": at_1000[FEEDBACK]["p99_ms"] <= 10.0 if at_1000 else None,
            "every_vote_recorded": all(r[FEEDBACK]["statuses"] == {"recorded": r[FEEDBACK]["requests"]} for r in closed)
            and all(
                o[FEEDBACK]["statuses"] == {"recorded": o[FEEDBACK]["requests"]} for o in measured_result["open_loop"]
            ),
        },
    }
    harness.write_result(args.output, result)
    print()
    print(tables(result))
    print()
    print(f"load average start {load_start}, end {result['load_average_end']}; written to {args.output}")


if __name__ == "__main__":
    main()
