"""Pairing worker throughput: feedback events/s turned into stored pairs by ONE consumer.

    .venv/bin/python bench/pairs_throughput.py [--events 100000] [--redis-url redis://127.0.0.1:6379/13]

Pre-fills the feedback stream (contract format) with a realistic mix: several responses per prompt, a few
votes per response from a pool of users, re-votes, withdrawals, corrections, some PII. Then one
FeedbackConsumer (the code a `pairs.consume` task runs, including its read and vote threads) drains it,
timed; consumer CPU is the whole process's (all three threads). Redis CPU is the server's main thread over the run, so
other clients of the same server count too: use an otherwise idle server for clean numbers. Round trips and commands are
counted on the consumer's own connection; Redis-side commands (including those run inside the Lua
scripts) come from INFO commandstats deltas, which are server-wide (other clients add noise). All keys
live under a unique prefix in the given DB and are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from redis import Connection, ConnectionPool, Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.core.config import Settings
from services.core.keys import Keys
from workers.pairing.consumer import FeedbackConsumer

TOPICS = [
    "How do I reverse a list in Python?",
    "Explain the difference between TCP and UDP.",
    "Write a haiku about autumn rain.",
    "What is the capital of Australia?",
    "Summarize the plot of Hamlet in two sentences.",
    "How many minutes are in a week?",
    "Give me three tips for a job interview.",
    "What does HTTP status 429 mean?",
]


def count_packed_commands() -> None:
    """CommandBatch packs with hiredis directly (bypassing Connection.pack_commands): count there too."""
    from workers.pairing import store as pairs_store

    original = pairs_store._pack_command

    def counting(args: Any) -> bytes:
        CountingConnection.commands += 1
        return original(args)

    pairs_store._pack_command = counting


class CountingConnection(Connection):
    """Counts network round trips (one per packed send) and commands sent."""

    round_trips = 0
    commands = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.round_trips += 1
        super().send_packed_command(command, check_health)

    def pack_commands(self, commands: Any) -> Any:
        commands = list(commands)
        CountingConnection.commands += len(commands)
        return super().pack_commands(commands)

    def pack_command(self, *args: Any) -> Any:
        CountingConnection.commands += 1
        return super().pack_command(*args)


def make_events(n: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    users = [f"user-{i}" for i in range(max(50, n // 20))]
    events: list[bytes] = []
    now = time.time() - 3600
    completions: list[tuple[str, list[dict[str, str]], str]] = []
    while len(events) < n:
        if not completions or rng.random() < 0.4:
            prompt_id = rng.randrange(n // 5 + 1)
            topic = TOPICS[prompt_id % len(TOPICS)]
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"{topic} (case {prompt_id})"},
            ]
            response = f"Answer {rng.randrange(1000)}: " + " ".join(rng.choice(TOPICS).split()[::-1]) * 3
            if rng.random() < 0.02:
                response += " Contact me at someone@example.org or +1 (555) 123-4567."
            completions.append((f"chatcmpl-{uuid.uuid4().hex[:24]}", messages, response))
            if len(completions) > 2000:
                completions.pop(0)
        cid, messages, response = rng.choice(completions[-50:])
        roll = rng.random()
        rating = "withdrawn" if roll < 0.05 else ("like" if roll < 0.6 else "dislike")
        correction = "A better, corrected answer." if rating == "dislike" and rng.random() < 0.05 else None
        now += rng.random() * 0.01
        event = {
            "feedback_id": uuid.uuid4().hex,
            "completion_id": cid,
            "user": rng.choice(users),
            "ip_hash": uuid.uuid4().hex[:16],
            "rating": rating,
            "comment": None,
            "correction": correction,
            "created_at": now,
            "interaction": {
                "messages": messages,
                "response": response,
                "model": "feedloop",
                "adapter": None,
                "sampling": {"temperature": 0.7, "max_tokens": 256},
            },
        }
        events.append(orjson.dumps(event))
    return events


def commandstats(redis: Redis) -> int:
    info: Any = redis.info("commandstats")
    return sum(int(v["calls"]) for v in info.values())


def redis_cpu(redis: Redis) -> float:
    info: Any = redis.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def run(events: int, redis_url: str, batch_size: int) -> dict[str, Any]:
    prefix = f"bench-pairs-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, redis_prefix=prefix)
    settings.pairs.batch_size = batch_size
    settings.pairs.strategies = ["same_prompt", "correction", "weaker_answer"]
    keys = Keys(prefix)
    admin = Redis.from_url(redis_url)
    try:
        payloads = make_events(events)
        pipe = admin.pipeline(transaction=False)
        for i, payload in enumerate(payloads, 1):
            pipe.xadd(keys.feedback_stream, {"event": payload})
            if i % 2000 == 0:
                pipe.execute()
        pipe.execute()

        count_packed_commands()
        pool = ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
        client = Redis(connection_pool=pool)
        consumer = FeedbackConsumer(client, keys, settings, name="bench")
        consumer.ensure_ready()
        CountingConnection.round_trips = CountingConnection.commands = 0
        server_before, redis_cpu_before = commandstats(admin), redis_cpu(admin)
        start, cpu_start = time.perf_counter(), time.process_time()
        report = consumer.consume(600, until_drained=True)
        elapsed, client_cpu = time.perf_counter() - start, time.process_time() - cpu_start
        server_after, redis_cpu_used = commandstats(admin), redis_cpu(admin) - redis_cpu_before
        # the drain check itself (XINFO GROUPS, the final empty read) is part of the loop; keep it counted
        return {
            "events": report.entries,
            "processed": report.processed,
            "pairs": int(admin.zcard(keys.pairs_index)),
            "dead_lettered": report.dead_lettered,
            "seconds": elapsed,
            "events_per_s": report.entries / elapsed,
            "consumer_cpu_s": client_cpu,
            "redis_cpu_s": redis_cpu_used,
            # what one consumer sustains when neither process waits for a CPU (the bottleneck side)
            "events_per_cpu_bound_s": report.entries / max(client_cpu, redis_cpu_used),
            # ... and when both share one core (their CPU times add up)
            "events_per_one_core_s": report.entries / (client_cpu + redis_cpu_used),
            "load_average_1m": os.getloadavg()[0],
            "round_trips_per_event": CountingConnection.round_trips / report.entries,
            "commands_per_event": CountingConnection.commands / report.entries,
            "server_commands_per_event": (server_after - server_before) / report.entries,
            "batch_size": batch_size,
        }
    finally:
        cursor = 0
        while True:
            cursor, found = admin.scan(cursor, match=f"{prefix}:*", count=5000)
            if found:
                admin.delete(*found)
            if cursor == 0:
                break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    result = run(args.events, args.redis_url, args.batch_size)
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print()
    print(
        "| events | batch | wall s | events/s (wall) | consumer CPU s | Redis CPU s | events/s (CPU-bound) "
        "| events/s (one core) | pairs stored | round trips/event | commands/event (client) "
        "| Redis commands/event (incl. Lua) | load 1m |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    r = result
    print(
        f"| {r['events']} | {r['batch_size']} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
        f"{r['consumer_cpu_s']:.2f} | {r['redis_cpu_s']:.2f} | {r['events_per_cpu_bound_s']:,.0f} | "
        f"{r['events_per_one_core_s']:,.0f} | {r['pairs']} | {r['round_trips_per_event']:.4f} | "
        f"{r['commands_per_event']:.2f} | {r['server_commands_per_event']:.1f} | {r['load_average_1m']:.1f} |"
    )


if __name__ == "__main__":
    main()
