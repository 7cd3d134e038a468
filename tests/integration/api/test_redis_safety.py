"""Start-up refuses an evicting Redis and warns without AOF (real redis-server processes)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time

import pytest
import redis

from services.core.redis import RedisUnsafe, check_redis_safety, connect
from tests.conftest import REPO, free_port


@pytest.fixture
def redis_server(tmp_path):
    procs = []

    def start(*args: str) -> str:
        port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--dir",
                    str(tmp_path),
                    *args,
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                return url
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait()


def test_evicting_redis_is_refused(redis_server):
    url = redis_server("--maxmemory-policy", "allkeys-lru", "--appendonly", "yes")
    with pytest.raises(RedisUnsafe, match="noeviction"):
        asyncio.run(check_redis_safety(connect(url)))


def test_aof_off_is_a_warning(redis_server, caplog):
    url = redis_server("--maxmemory-policy", "noeviction", "--appendonly", "no")
    with caplog.at_level(logging.WARNING):
        asyncio.run(check_redis_safety(connect(url)))
    assert "AOF off" in caplog.text


def test_safe_redis_passes_quietly(redis_server, caplog):
    url = redis_server("--maxmemory-policy", "noeviction", "--appendonly", "yes")
    with caplog.at_level(logging.WARNING):
        asyncio.run(check_redis_safety(connect(url)))
    assert caplog.text == ""


def test_serve_refuses_to_start_on_evicting_redis(redis_server, tiny_model_dir):
    url = redis_server("--maxmemory-policy", "allkeys-lru")
    env = {
        "REDIS_URL": url,
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_API__PORT": str(free_port()),
        "FEEDLOOP_FEEDBACK__SECRET": "redis-safety-test-secret",
        "PATH": "/usr/bin:/bin",
    }
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "noeviction" in out.stdout + out.stderr
