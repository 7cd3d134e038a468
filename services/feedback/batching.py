"""Automatic pipelining of one Lua script: the calls that arrive while a round trip is in flight go
together in the next one.

Under load a redis-py command costs far more client CPU than the script costs Redis; sending the calls
that queue up meanwhile as one pipeline (not a transaction: each script call stays atomic on its own)
pays that cost once per batch. An idle server sends each call at once, so nothing waits for a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, NoScriptError, ResponseError, TimeoutError

Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: Redis, script: str, max_batch: int = 256):
        self.redis = redis
        self.script = redis.register_script(script)
        self.max_batch = max_batch
        self._queue: list[Call] = []
        self._sender: asyncio.Task[None] | None = None
        self._connection: Any = None

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)  # an abandoned call's error is not "never retrieved"
        self._queue.append((keys, args, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all())
        # A caller that goes away cancels only its own future; its call still goes out with the batch.
        return await future

    async def _send_all(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                replies = await self._run(batch)
            except Exception as error:  # the connection failed: every call in the batch fails with it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), reply in zip(batch, replies, strict=True):
                if future.done():
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)

    async def _run(self, batch: list[Call]) -> list[Any]:
        try:
            replies = await self._pipeline(batch)
        except (ConnectionError, TimeoutError):
            # A dropped connection (Redis restarted, a proxy timed it out): once more on a new one. Safe
            # because a call that did run before the drop finds its own write already there.
            replies = await self._pipeline(batch)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # Redis restarted or flushed its script cache: load the script, run those again
            self.script.sha = await self.redis.script_load(self.script.script)
            for i, reply in zip(missing, await self._pipeline([batch[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        # hiredis packs a call in C; redis-py's pipeline would spend more CPU than the request it serves
        sha = self.script.sha
        payload = b"".join(pack_command(("EVALSHA", sha, len(keys), *keys, *args)) for keys, args, _ in batch)
        # One batch is in flight at a time, so one connection of its own serves them all (no pool hand-offs).
        conn = self._connection
        if conn is None:
            conn = self._connection = self.redis.connection_pool.make_connection()
        try:
            await conn.send_packed_command(payload)
            replies: list[Any] = []
            for _ in batch:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as error:  # an error reply: that call's own result
                    replies.append(error)
            return replies
        except BaseException:
            await conn.disconnect()  # replies may be half read: the next batch reconnects
            raise

    async def aclose(self) -> None:
        if self._connection is not None:
            await self._connection.disconnect()
            self._connection = None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
