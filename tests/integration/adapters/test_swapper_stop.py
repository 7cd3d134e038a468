"""A replica's background loops stop however early its shutdown comes.

redis-py can swallow a cancellation that lands inside a pub/sub subscribe or a connect (redis/redis-py#2028,
#2551). The adapter swapper's promotions listener is a `while True` loop around one, so a shutdown right after
start-up (seen: `feedloop serve` whose port was taken while its engine loaded) once waited on it forever."""

from __future__ import annotations

import asyncio
import random
import uuid

from services.adapters.hotswap import Swapper
from services.core.keys import Keys
from services.core.redis import connect
from services.core.redis_watch import RedisWatch
from services.engine.engine import Engine
from services.feedback.interactions import InteractionLog
from tests.conftest import TEST_REDIS_URL

CYCLES = 40
LOOP_NAMES = {"adapter-reconcile", "adapter-promotions", "redis-watch", "interaction-log-writer"}


async def shutdown(swapper: Swapper, watch: RedisWatch, interactions: InteractionLog) -> None:
    """What the API's lifespan stops, in its order."""
    await swapper.stop()
    await watch.stop()
    await interactions.close()


async def test_start_then_stop_at_once_always_ends(tiny_engine: Engine) -> None:
    settings = tiny_engine.settings
    keys = Keys(f"swapper-stop-{uuid.uuid4().hex[:6]}")
    redis = connect(TEST_REDIS_URL, settings=settings)
    rng = random.Random(7)
    try:
        for cycle in range(CYCLES):
            # what the API's lifespan starts, in its order
            watch = RedisWatch(redis, keys, interval_s=0.5)
            await watch.check()
            watch.start()
            interactions = InteractionLog(redis, keys, ttl_s=60)
            interactions.start()
            swapper = Swapper(tiny_engine, redis, keys, settings, watch=watch)
            await swapper.start()
            # the cancellation lands inside the listener's subscribe (the first few ms) or its reads
            await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.003, 0.01, 0.05]))

            stopping = asyncio.create_task(shutdown(swapper, watch, interactions))
            done, _ = await asyncio.wait([stopping], timeout=20)
            assert done, f"cycle {cycle}: the shutdown did not end in 20 s"
            stopping.result()
            left = [t.get_name() for t in asyncio.all_tasks() if t.get_name() in LOOP_NAMES and not t.done()]
            assert not left, f"cycle {cycle}: still running after the shutdown: {left}"
    finally:
        async for key in redis.scan_iter(match=f"{keys.prefix}:*"):
            await redis.delete(key)
        await redis.aclose()
