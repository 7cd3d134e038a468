"""Redis restarts: with and without its data, against real redis-server processes killed with SIGKILL.

* The pairs consumer survives a Redis that comes back empty (NOGROUP): the same consumer object, in the
  same process, recreates its group and pairs what arrives next.
* Run, dataset and adapter numbers never reuse a number whose folder is on disk, although the Redis
  counters handing them out restarted at 0.
* With AOF on (``appendfsync always`` or ``everysec``), no vote that the store acknowledged is lost across
  ``kill -9`` of Redis.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from services.core.config import Settings
from services.core.counters import highest_on_disk, next_number
from services.core.keys import Keys
from services.core.redis import connect
from tests.support.redis_server import RedisServer
from tests.support.stream_data import pair_ids, two_answer_prompts
from workers.pairing.consumer import FeedbackConsumer


def test_pairs_consumer_recreates_its_group_after_redis_comes_back_empty(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_server()  # no AOF, no snapshots: a restart loses everything
    client = server.client(socket_timeout=5)
    keys = Keys("faults-nogroup")
    settings = Settings(
        redis_url=server.url,
        redis_prefix=keys.prefix,
        engine={"model": str(tmp_path / "no-model")},  # token limits fall back to the heuristic
        pairs={"strategies": ["same_prompt"], "batch_size": 50, "block_ms": 50, "claim_idle_ms": 500},
    )
    consumer = FeedbackConsumer(client, keys, settings, name="faults-consumer")

    before = two_answer_prompts(client, keys, 0, 40)  # 80 entries sent
    report = consumer.consume(20, until_drained=True)
    assert (report.processed, report.failed, report.dead_lettered) == (80, 0, 0)
    assert pair_ids(client, keys) == before

    server.restart()  # SIGKILL, back without data: no stream, no group, no pairs, no scripts
    assert client.dbsize() == 0

    after = two_answer_prompts(client, keys, 40, 70)  # 60 entries sent to a stream that has no group
    report = consumer.consume(20, until_drained=True)  # the same object: no process restart
    stored = pair_ids(client, keys)
    sent, acknowledged = 60, report.processed
    lost = after - stored
    duplicated = int(client.get(keys.pairs_seq) or 0) - len(stored)
    assert (sent, acknowledged, len(stored), len(lost), duplicated) == (60, 60, 30, 0, 0)
    assert stored == after
    assert consumer.group_backlog() == (0, 0)
    assert not client.exists(keys.feedback_dead_letter)


def test_run_dataset_and_adapter_numbers_on_disk_are_never_reused(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    from services.adapters.registry import AdapterRegistry
    from workers.pairing.datasets import next_version
    from workers.training.runs import RunStore

    server = redis_server()
    client = server.client(socket_timeout=5)
    keys = Keys("faults-counters")
    runs_dir, datasets_dir, adapters_dir = tmp_path / "runs", tmp_path / "datasets", tmp_path / "adapters"
    runs = RunStore(client, keys, runs_dir=runs_dir)
    registry = AdapterRegistry(client, keys, alias="feedloop")

    # Three runs, two dataset versions and two adapters are made while Redis keeps its counters ...
    made_runs = [runs.next_run_id() for _ in range(3)]
    made_datasets = [next_version(client, keys, datasets_dir) for _ in range(2)]
    made_adapters = [registry.next_version(adapters_dir=adapters_dir) for _ in range(2)]
    assert (made_runs, made_datasets, made_adapters) == (
        ["run-1", "run-2", "run-3"],
        ["ds-000001", "ds-000002"],
        ["feedloop-v1", "feedloop-v2"],
    )
    for folder, names in ((runs_dir, made_runs), (datasets_dir, made_datasets), (adapters_dir, made_adapters)):
        for name in names:
            (folder / name).mkdir(parents=True)
    (datasets_dir / ".ds-000003.k2j4x").mkdir()  # a snapshot interrupted mid-write also holds its number

    server.restart()  # ... then Redis comes back without data: every counter starts again at 0
    assert client.get(keys.runs_seq) is None

    assert runs.next_run_id() == "run-4"
    assert next_version(client, keys, datasets_dir) == "ds-000004"
    assert registry.next_version(adapters_dir=adapters_dir) == "feedloop-v3"
    # and the counters moved past the disk: the next numbers follow on without scanning gaps
    assert runs.next_run_id() == "run-5"
    assert highest_on_disk([adapters_dir, None, tmp_path / "missing"], r"feedloop-v(\d+)") == 2
    assert next_number(client, keys.adapters_seq, floor=0) == 4


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_aof_loses_no_acknowledged_vote_across_kill_9(
    redis_server: Callable[..., RedisServer], tmp_path: Path, fsync: str
) -> None:
    """kill -9 of the Redis process mid-vote. With `always` every acknowledged vote was fsynced; with `everysec`
    the AOF write() still reached the kernel before the reply, so a process kill loses nothing either (its one
    second window is for a machine crash, which a test cannot stage)."""
    from services.feedback.votes import FeedbackStore, Limits

    server = redis_server("--appendonly", "yes", "--appendfsync", fsync)
    keys = Keys("faults-aof")
    total, concurrency, kill_after = 3000, 32, 600
    acknowledged: list[str] = []
    failed: list[str] = []
    killed = threading.Event()

    async def vote_all() -> None:
        redis = connect(server.url, socket_timeout_s=2, connect_timeout_s=1)
        store = FeedbackStore(redis, keys, 3600, Limits(1e9, 10**9, 1e9, 10**9))
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)

        async def voter() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                cid, user = f"chatcmpl-{i}", f"user-{i}"
                head = {"feedback_id": f"f{i}", "completion_id": cid, "user": user, "rating": "like"}
                try:
                    outcome = await store.vote(
                        cid, user, "iphash", {"rating": "like"}, head, time.time(), token_user=user,
                        record=orjson.dumps({"id": cid, "user": user, "adapter": None}),
                    )  # fmt: skip
                except Exception:
                    failed.append(cid)
                    continue
                assert outcome.status == "recorded"
                acknowledged.append(cid)
                if len(acknowledged) == kill_after and not killed.is_set():
                    killed.set()
                    await asyncio.to_thread(server.kill)  # mid-stream: votes are in flight right now

        await asyncio.gather(*(voter() for _ in range(concurrency)))
        await store.aclose()
        await redis.aclose()

    asyncio.run(vote_all())
    assert killed.is_set()
    server.start()  # same port, same folder: Redis replays its AOF
    client = server.client()
    stored = [orjson.loads(fields[b"event"])["completion_id"] for _, fields in client.xrange(keys.feedback_stream)]
    lost = set(acknowledged) - set(stored)
    duplicated = len(stored) - len(set(stored))
    counts = {
        "sent": total,
        "acknowledged": len(acknowledged),
        "stored": len(stored),
        "lost": len(lost),
        "duplicated": duplicated,
    }
    print(f"aof {fsync}, kill -9:", counts)
    assert counts["acknowledged"] >= kill_after and len(failed) > 0  # the kill really hit votes in flight
    assert counts["lost"] == 0 and counts["duplicated"] == 0, counts
    # every stored vote is complete: its vote hash entry is there too (the script wrote all or nothing)
    assert all(client.hexists(keys.votes(cid), f"user-{cid.split('-')[1]}") for cid in stored)
