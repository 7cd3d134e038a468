"""What a serving replica knows about its Redis: is it reachable, and is it still the Redis it started with.

Chat needs no Redis, so Redis trouble is reported (``/readyz``'s body, metrics, alerts), never a reason to
stop serving. :class:`RedisWatch` pings Redis every few seconds and reads the *epoch key*, a random id
written once into an empty Redis (SET NX). A Redis that restarts without its data (no AOF, a new pod, a
failover to an empty replica) comes back without that key: the first process to notice writes a new epoch,
and every process that knew the old one counts a data loss (``feedloop_redis_data_loss_total``, alert
``FeedloopRedisDataLost``). The hot-swapper asks :meth:`RedisWatch.check` before it follows an empty
registry back to the base model: after a data loss it keeps serving the adapter it has.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

from redis.exceptions import ResponseError

from services.core import metrics
from services.core.keys import Keys
from services.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisWatch:
    def __init__(self, redis: Any, keys: Keys, interval_s: float = 5.0) -> None:
        self.redis = redis
        self.keys = keys
        self.interval_s = interval_s
        self.up: bool | None = None  # None: not checked yet
        self.epoch: str | None = None
        self.data_losses = 0
        self.last_error: str | None = None
        self.down_since: float | None = None
        self.last_loss_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> bool:
        """Ping Redis and compare its epoch with the one seen before; True when Redis answered."""
        async with self._lock:
            try:
                raw = await self.redis.get(self.keys.redis_epoch)
                if raw is None:  # an empty Redis (first start, or data lost): the first to see it writes one
                    await self.redis.set(self.keys.redis_epoch, uuid.uuid4().hex, nx=True)
                    raw = await self.redis.get(self.keys.redis_epoch)
            except asyncio.CancelledError:
                raise
            except ResponseError as error:  # it answered, refusing (e.g. OOM under noeviction): reachable
                self._answered(f"{type(error).__name__}: {error}"[:300])
                return True
            except Exception as error:
                if self.up is not False:
                    log.warning("Redis is unreachable (%s): chat goes on, feedback and hot-swaps wait", error)
                    self.down_since = time.time()
                self.up = False
                self.last_error = f"{type(error).__name__}: {error}"[:300]
                metrics.REDIS_UP.set(0)
                return False
            self._answered(None)
            if raw is None:
                return True
            epoch = _text(raw)
            if self.epoch is not None and epoch != self.epoch:
                self.data_losses += 1
                self.last_loss_at = time.time()
                metrics.REDIS_DATA_LOSS.inc()
                log.error(
                    "Redis lost its data (epoch %s -> %s): it restarted without persistence or failed over to an "
                    "empty replica. Votes, pairs and the adapter registry written before are gone; this replica "
                    "keeps serving the adapter it has.",
                    self.epoch,
                    epoch,
                )
            self.epoch = epoch
            return True

    def _answered(self, error: str | None) -> None:
        if self.up is False:
            log.info("Redis is reachable again")
        self.up, self.last_error, self.down_since = True, error, None
        metrics.REDIS_UP.set(1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    def state(self) -> dict[str, Any]:
        """For /readyz's body."""
        return {
            "up": self.up,
            "error": self.last_error,
            "down_since": self.down_since,
            "data_losses": self.data_losses,
            "last_data_loss_at": self.last_loss_at,
        }
