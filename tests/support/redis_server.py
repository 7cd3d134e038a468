"""A real redis-server that a test starts, SIGKILLs and restarts on a port of its own (the fault tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from services.cli.procs import free_port


class RedisServer:
    def __init__(self, data_dir: Path, args: tuple[str, ...]) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.data_dir), "--maxmemory-policy", "noeviction", *self.args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with redis.Redis.from_url(self.url, socket_timeout=1) as client:
                    if client.ping():
                        return self
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def client(self, **kw: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kw)  # type: ignore[arg-type]


@contextmanager
def private_redis(data_dir: Path, *args: str) -> Iterator[RedisServer]:
    """A redis-server of the test's own, killed on exit: for tests that do something server-wide (SCRIPT FLUSH,
    a restart) that must not reach other suites sharing the test Redis."""
    server = RedisServer(data_dir, args).start()
    try:
        yield server
    finally:
        server.kill()
