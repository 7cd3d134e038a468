"""cancel_and_wait: a background loop is stopped even when its first cancellation is swallowed (as redis-py can
swallow one that lands inside a command), and a loop that never stops is given up on instead of hanging."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.core.tasks import cancel_and_wait


async def swallows_first_cancel(ran: list[str]) -> None:
    """A `while True` loop around a call that turns the first cancellation into a normal return."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if swallowed:
                ran.append("cancelled")
                raise
            swallowed = True
            asyncio.current_task().uncancel()  # type: ignore[union-attr]


async def test_a_loop_that_swallowed_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    ran: list[str] = []
    task = asyncio.create_task(swallows_first_cancel(ran), name="swallower")
    await asyncio.sleep(0.01)
    assert await cancel_and_wait(task, timeout_s=5) is True
    assert task.cancelled() and ran == ["cancelled"]


async def test_a_loop_that_never_stops_is_given_up_on_after_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    released = asyncio.Event()

    async def stops_only_when_released() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]

    task = asyncio.create_task(stops_only_when_released(), name="stubborn")
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with caplog.at_level(logging.WARNING, logger="services.core.tasks"):
        assert await cancel_and_wait(task, timeout_s=1.2) is False
    assert 1.1 <= loop.time() - started < 3
    assert "stubborn did not stop in 1 s" in caplog.text
    assert not task.done()
    released.set()
    await task


async def test_an_error_the_task_ended_with_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    async def fails_on_cancel() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("flush failed") from None

    task = asyncio.create_task(fails_on_cancel(), name="flusher")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="services.core.tasks"):
        assert await cancel_and_wait(task) is True
    assert "flusher ended with RuntimeError('flush failed')" in caplog.text


async def test_none_and_finished_tasks_need_nothing() -> None:
    async def done() -> None:
        return None

    task = asyncio.create_task(done())
    await task
    assert await cancel_and_wait(task) is True
    assert await cancel_and_wait(None) is True
