"""Real Celery worker and beat processes for the training-loop tests, each in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGS = REPO / "test-artifacts" / "logs"


class CeleryProcess:
    def __init__(self, args: list[str], env: dict[str, str], name: str, ready_marker: str) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.celery_app", *args],
                cwd=REPO,
                env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ready_marker = ready_marker

    def wait_ready(self, timeout: float = 120) -> CeleryProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            if self.ready_marker in self.log_path.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{self.log()}")

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole process group: whatever it was doing stops mid-way."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def worker(env: dict[str, str], queue: str, concurrency: int = 1) -> CeleryProcess:
    """A threads-pool worker (one process: SIGKILL kills the task with it), no prefetch beyond its threads."""
    name = f"{queue}-worker-{uuid.uuid4().hex[:6]}"
    args = [
        "worker", "-Q", queue, "-P", "threads", "-c", str(concurrency), "--disable-prefetch",
        "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO",
    ]  # fmt: skip
    return CeleryProcess(args, env, name, " ready.")


def beat(env: dict[str, str], schedule_file: Path) -> CeleryProcess:
    name = f"beat-{uuid.uuid4().hex[:6]}"
    return CeleryProcess(["beat", "-s", str(schedule_file), "-l", "INFO"], env, name, "beat: Starting")
