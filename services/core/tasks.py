"""Stopping the API's background loops (Redis writers, watchers, subscribers) for certain."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

RECANCEL_INTERVAL_S = 0.5


async def cancel_and_wait(task: asyncio.Task[None] | None, timeout_s: float = 10.0) -> bool:
    """Cancel TASK and wait until it has ended; True when it did within TIMEOUT_S.

    redis-py can swallow a cancellation that lands inside a command (a pub/sub subscribe, a connect:
    redis/redis-py#2028 and #2551), and a ``while True`` loop around that command then runs on forever,
    hanging whoever awaits it (a shutdown). So the task is cancelled again every half second until it ends,
    and given up on with a warning after TIMEOUT_S. Whatever the task raised is logged, never re-raised:
    the rest of a shutdown still runs."""
    if task is None or task.done():
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.warning("background task %s did not stop in %.0f s; leaving it", task.get_name(), timeout_s)
            return False
        task.cancel()
        await asyncio.wait([task], timeout=min(RECANCEL_INTERVAL_S, left))
    if not task.cancelled() and (error := task.exception()) is not None:
        log.warning("background task %s ended with %r", task.get_name(), error)
    return True
