"""`feedloop up` on a machine with no Redis answering: it starts its own, serves chat, and stops cleanly."""

from __future__ import annotations

import re
import signal
import time

import psutil
import pytest
from openai import OpenAI

from services.cli.main import redis_answers
from tests.conftest import ARTIFACTS, free_port, start_feedloop


@pytest.mark.slow
def test_up_starts_private_redis_serves_and_stops_cleanly(tiny_model_dir, tmp_path):
    port = free_port()
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    env = {
        "REDIS_URL": dead_redis,
        "FEEDLOOP_REDIS_URL": dead_redis,
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "FEEDLOOP_API__PORT": str(port),
        "FEEDLOOP_METRICS_PORT": str(free_port()),
        "FEEDLOOP_CANARY__SHARE": None,  # as on a user's machine: the product's default (a canary share of 0.1)
    }
    server = start_feedloop(["up"], env, port, ARTIFACTS / "logs" / "feedloop-up.log")
    try:
        log = server.log_path.read_text(errors="replace")
        found = re.search(r"private Redis at (redis://127\.0\.0\.1:\d+/0)", log)
        assert found, log
        private_url = found.group(1)
        assert redis_answers(private_url)
        assert (tmp_path / "data" / "redis").is_dir()
        children = psutil.Process(server.proc.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "redis-server" in names and "worker" in names and "beat" in names
        # one machine has too few users to decide a canary: `up` promotes straight away, and says so
        assert "serve everyone at once" in log

        client = OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="feedloop", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
        assert r.choices[0].message.content is not None
        assert "metrics" in log and "/metrics" in log
        # the embedded default: no API key needed, and the banner says so; a feedback secret of its own
        assert "auth off" in log
        secret_file = tmp_path / "data" / "feedback-secret"
        assert len(secret_file.read_text().strip()) >= 32 and secret_file.stat().st_mode & 0o077 == 0
    finally:
        code = server.stop(signal.SIGINT, timeout=90)
    assert code == 0, server.log()
    assert not redis_answers(private_url)
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert "private Redis stopped" in server.log_path.read_text(errors="replace")
