"""The API's port is taken before anything slow starts: a port in use fails at once with its number, and no
port the engine opens while it loads (its worker binds several to 0) can take it meanwhile."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ARTIFACTS, FEEDBACK_SECRET, REPO, TEST_REDIS_URL, free_port, launch_feedloop, wait_ready


def env_for(tiny_model_dir: Path, tmp_path: Path, port: int) -> dict[str, str]:
    return {
        "FEEDLOOP_REDIS_URL": TEST_REDIS_URL,
        "FEEDLOOP_REDIS_PREFIX": f"api-port-{uuid.uuid4().hex[:6]}",
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "FEEDLOOP_API__PORT": str(port),
        "FEEDLOOP_FEEDBACK__SECRET": FEEDBACK_SECRET + "-long-enough-for-serve",
    }


@pytest.mark.parametrize("command", [["serve"], ["up", "--no-workers"]])
def test_a_port_in_use_fails_at_once_and_names_it(command: list[str], tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", *command],
            cwd=REPO,
            env={**os.environ, **env_for(tiny_model_dir, tmp_path, port)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        took = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in output
    # before anything slow or stateful: no engine, no Redis of its own, no worker
    assert "starting the engine" not in output and "private Redis" not in output, output
    assert took < 60, f"{took:.0f} s to fail"


def test_serve_holds_its_port_while_the_engine_starts(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    server = launch_feedloop(
        ["serve"], env_for(tiny_model_dir, tmp_path, port), port, ARTIFACTS / "logs" / f"api-port-{port}.log"
    )
    try:
        deadline = time.monotonic() + 120
        while "starting the engine" not in server.log_path.read_text(errors="replace"):
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        # the engine is loading: the port is this process's already (nobody else can bind it) ...
        with socket.socket() as other, pytest.raises(OSError) as taken:
            other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
        # ... and it answers once the API is up
        wait_ready(server)
    finally:
        code = server.stop(signal.SIGINT, timeout=60)
    assert code == 0, server.log()
