"""Redis memory: bytes per vote and per pair, and whether memory levels off under steady traffic.

Runs against a private redis-server (started and stopped here; nothing else shares it):

1. **per vote** (the API side): N completions are logged and voted on through the real vote script
   (services/feedback/votes.py): interaction record, vote hash, vote history, stream entry, rate buckets.
2. **per pair**: the pairs worker (workers/pairing/consumer.py) consumes those votes (a liked and a disliked
   answer per prompt: one pair each), with the stream trimmed as it goes (pairs.trim_acknowledged).
3. **steady state**: simulated days of traffic (``--votes-per-day``) through the stream, the consumer (trim)
   and the daily compaction (pairs.retention_s, here ``--retention-days``), sampling used_memory each day.
   Keys with a real-time TTL (interactions, vote hashes: ``interactions.ttl_s``) are not part of this
   simulation: they are bounded by their TTL. Without retention the same traffic grows without bound.

    .venv/bin/python bench/redis_memory.py                      # ~1 min here
    .venv/bin/python bench/redis_memory.py --votes-per-day 10000 --days 100 --no-baseline   # 1M votes

Writes bench/results/redis_memory.json (``--out`` for another file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from services.core.config import Settings  # noqa: E402
from services.core.keys import Keys  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

DAY_S = 24 * 3600


def used(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def event(i: int, day: float, rating: str) -> bytes:
    cid = f"{rating[0]}{i}"
    return orjson.dumps(
        {
            "feedback_id": f"f{cid}",
            "completion_id": cid,
            "user": f"u{i}-{rating}",
            "ip_hash": "0" * 16,
            "rating": rating,
            "comment": None,
            "correction": None,
            "created_at": day + i / 1e6,
            "interaction": {
                "messages": [{"role": "user", "content": f"Question number {i // 1}: what is {i} plus {i}?"}],
                "response": f"The answer to question {i} is {2 * i if rating == 'like' else 2 * i + 1}.",
                "model": "feedloop",
                "adapter": "feedloop-v3",
                "sampling": {"temperature": 0.7},
            },
        }
    )


async def per_vote(server: RedisServer, votes: int) -> dict[str, float]:
    from services.core.redis import connect
    from services.feedback.votes import FeedbackStore, Limits

    redis = connect(server.url)
    keys = Keys("bench-votes")
    store = FeedbackStore(redis, keys, 30 * DAY_S, Limits(1e9, 10**9, 1e9, 10**9))
    before = int((await redis.info("memory"))["used_memory"])
    for start in range(0, votes, 500):
        batch = range(start, min(start + 500, votes))
        pipe = redis.pipeline(transaction=False)
        records = {}
        for i in batch:
            record = {
                "id": f"chatcmpl-{i}",
                "messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"}],
                "response": f"The answer to question {i} is {2 * i}.",
                "model": "feedloop",
                "adapter": "feedloop-v3",
                "sampling": {"temperature": 0.7},
                "user": f"user-{i}",
            }
            records[i] = record
            pipe.set(keys.interaction(f"chatcmpl-{i}"), orjson.dumps(record), ex=30 * DAY_S)
        await pipe.execute()
        await asyncio.gather(
            *(
                store.vote(
                    f"chatcmpl-{i}",
                    f"user-{i}",
                    "iphash",
                    {"rating": "like", "comment": None, "correction": None},
                    {"feedback_id": f"f{i}", "completion_id": f"chatcmpl-{i}", "user": f"user-{i}", "rating": "like"},
                    time.time(),
                    token_user=f"user-{i}",
                )
                for i in batch
            )
        )
    after = int((await redis.info("memory"))["used_memory"])
    await store.aclose()
    await redis.aclose()
    return {"votes": votes, "bytes_per_vote_with_interaction": (after - before) / votes}


def pairing_side(server: RedisServer, tmp: Path, prompts: int) -> dict[str, float]:
    from workers.pairing.consumer import FeedbackConsumer

    client = server.client()
    keys = Keys("bench-pairs")
    settings = Settings(
        redis_prefix=keys.prefix, engine={"model": str(tmp / "none")}, pairs={"strategies": ["same_prompt"]}
    )
    consumer = FeedbackConsumer(client, keys, settings, name="bench")
    before = used(client)
    for start in range(0, prompts, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 1000, prompts)):
            pipe.xadd(keys.feedback_stream, {b"event": event(i, time.time(), "like")})
            pipe.xadd(keys.feedback_stream, {b"event": event(i, time.time(), "dislike")})
        pipe.execute()
    in_stream = used(client)
    consumer.consume(600, until_drained=True)
    after = used(client)
    pairs = int(client.zcard(keys.pairs_index))
    return {
        "votes": 2 * prompts,
        "pairs": pairs,
        "stream_bytes_per_vote": (in_stream - before) / (2 * prompts),
        "pairing_bytes_per_pair_after_trim": (after - before) / max(pairs, 1),
        "stream_length_after_trim": int(client.xlen(keys.feedback_stream)),
    }


def steady_state(server: RedisServer, tmp: Path, per_day: int, days: int, retention_days: int) -> list[dict[str, Any]]:
    from workers.pairing.consumer import FeedbackConsumer
    from workers.pairing.retention import compact

    client = server.client()
    keys = Keys(f"bench-steady-{retention_days}")
    settings = Settings(
        redis_prefix=keys.prefix,
        engine={"model": str(tmp / "none")},
        feedback={"token_ttl_s": DAY_S},
        pairs={"strategies": ["same_prompt"], "retention_s": retention_days * DAY_S},
    )
    consumer = FeedbackConsumer(client, keys, settings, name="steady")
    start = time.time() - days * DAY_S
    base = used(client)
    samples = []
    for day in range(days):
        at = start + day * DAY_S
        pipe = client.pipeline(transaction=False)
        for n in range(per_day // 2):
            i = day * per_day + n
            pipe.xadd(keys.feedback_stream, {b"event": event(i, at, "like")})
            pipe.xadd(keys.feedback_stream, {b"event": event(i, at, "dislike")})
        pipe.execute()
        consumer.consume(600, until_drained=True)
        if retention_days:
            compact(client, keys, settings, now=at)
        samples.append({"day": day + 1, "bytes": used(client) - base, "pairs": int(client.zcard(keys.pairs_index))})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--votes", type=int, default=20_000, help="votes for the per-vote figure")
    parser.add_argument("--votes-per-day", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--retention-days", type=int, default=10)
    parser.add_argument("--out", default="", help="result file (default bench/results/redis_memory.json)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the same traffic without retention")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="redis-memory-"))
    server = RedisServer(tmp / "redis", ()).start()
    try:
        results: dict[str, Any] = {"per_vote": asyncio.run(per_vote(server, args.votes))}
        results["per_pair"] = pairing_side(server, tmp, args.votes // 2)
        with_retention = steady_state(server, tmp, args.votes_per_day, args.days, args.retention_days)
        without = [] if args.no_baseline else steady_state(server, tmp, args.votes_per_day, args.days, 0)
        half = len(with_retention) // 2
        results["steady_state"] = {
            "votes_per_day": args.votes_per_day,
            "days": args.days,
            "total_votes": args.votes_per_day * args.days,
            "retention_days": args.retention_days,
            "with_retention": with_retention,
            "without_retention": without,
            # levels off: the second half of the run grows by less than a tenth of what the first half did
            "levels_off": (with_retention[-1]["bytes"] - with_retention[half]["bytes"])
            < 0.1 * max(with_retention[half]["bytes"], 1),
        }
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / "redis_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    steady = results["steady_state"]
    vote, pair = results["per_vote"], results["per_pair"]
    print(f"bytes per vote (API side, with its interaction record): {vote['bytes_per_vote_with_interaction']:.0f}")
    print(f"stream bytes per vote: {pair['stream_bytes_per_vote']:.0f}")
    print(f"pairing bytes per pair (stream trimmed): {pair['pairing_bytes_per_pair_after_trim']:.0f}")
    for label in ("with_retention", "without_retention"):
        series = steady[label]
        if not series:
            continue
        sampled = [f"d{s['day']}:{s['bytes'] / 1e6:.1f}MB" for s in series[:: max(1, len(series) // 8)]]
        print(label, sampled, f"last {series[-1]['bytes'] / 1e6:.1f}MB")
    print("levels off with retention:", steady["levels_off"])


if __name__ == "__main__":
    main()
