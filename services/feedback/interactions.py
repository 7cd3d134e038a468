"""The interaction log: every completion recorded in Redis, written off the hot path.

Routes hand a finished record to ``record()`` (no I/O); a background task writes batches with one
pipelined round trip. Records still in the buffer are visible through ``get()``, so feedback that
arrives before the write lands still finds its interaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

import orjson
from redis.asyncio import Redis

from services.core import metrics
from services.core.keys import Keys
from services.core.tasks import cancel_and_wait

log = logging.getLogger(__name__)


class InteractionLog:
    """max_buffered bounds the buffer while Redis is slow or down: past it the oldest record is dropped
    (counted in feedloop_interaction_writes_total{outcome="dropped"}), so an outage costs a bounded amount of
    memory and the newest completions, the likeliest to be rated, stay votable."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        ttl_s: int,
        flush_interval_s: float = 0.005,
        batch_size: int = 256,
        max_buffered: int = 50_000,
    ):
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.max_buffered = max(1, max_buffered)
        self.dropped = 0
        self._buffer: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.failed_writes = 0

    def record(self, record: dict[str, Any]) -> None:
        self._buffer[record["id"]] = record
        if len(self._buffer) > self.max_buffered:
            self._buffer.popitem(last=False)
            self.dropped += 1
            metrics.INTERACTION_WRITES.labels("dropped").inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning(
                    "interaction buffer full (%d records, Redis slow or down): %d oldest dropped so far",
                    self.max_buffered,
                    self.dropped,
                )
        metrics.INTERACTION_WRITE_QUEUE.set(len(self._buffer))
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._buffer)

    def buffered(self, completion_id: str) -> dict[str, Any] | None:
        """The record if it is still waiting to be written to Redis."""
        return self._buffer.get(completion_id)

    async def get(self, completion_id: str) -> dict[str, Any] | None:
        if (record := self._buffer.get(completion_id)) is not None:
            return record
        raw = await self.redis.get(self.keys.interaction(completion_id))
        return orjson.loads(raw) if raw else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="interaction-log-writer")

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        try:
            await self.flush()
        except Exception as error:  # Redis down at shutdown: the rest of the shutdown must still run
            log.error("%d interaction records not written at shutdown: %s", len(self._buffer), error)

    async def flush(self) -> None:
        while self._buffer:
            await self._write_batch()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_interval_s)  # let a burst accumulate into one pipeline
            try:
                await self.flush()
                backoff = 0.05
            except Exception:  # Redis down: keep the records, try again
                self.failed_writes += 1
                metrics.INTERACTION_WRITES.labels("failed").inc()
                log.exception("writing interactions to Redis failed; retrying in %.2fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def _write_batch(self) -> None:
        batch = list(self._buffer.items())[: self.batch_size]
        async with self.redis.pipeline(transaction=False) as pipe:
            for completion_id, record in batch:
                pipe.set(self.keys.interaction(completion_id), orjson.dumps(record), ex=self.ttl_s)
            await pipe.execute()
        for completion_id, record in batch:
            if self._buffer.get(completion_id) is record:
                del self._buffer[completion_id]
        self.written += len(batch)
        metrics.INTERACTION_WRITES.labels("written").inc(len(batch))
        metrics.INTERACTION_WRITE_QUEUE.set(len(self._buffer))
