"""Fault tests: real redis-server processes that the tests start, SIGKILL and restart on ports of their own.

``redis_server(*args)`` starts one (no snapshots, AOF off unless args say otherwise, noeviction) and returns
a :class:`~tests.support.redis_server.RedisServer`; every server a test started is killed at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    servers: list[RedisServer] = []

    def start(*args: str) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}", args)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.kill()
