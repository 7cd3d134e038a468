"""What the HTTP benchmarks share: server subprocesses that are always cleaned up, ports, statistics.

Servers start in their own session (process group) so that stopping one also stops the processes it
spawned (vLLM's engine core). Every started server is stopped when the benchmark exits, also on Ctrl-C
or SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from services.cli.procs import free_port

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
LOGS = REPO / "data" / "bench-cache" / "logs"
TINY_MODEL = REPO / "data" / "bench-cache" / "tiny-model"

_running: list[Server] = []


class Server:
    """A server subprocess in its own process group, with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], port: int):
        self.name = name
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = LOGS / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                list(argv),
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _running.append(self)

    def wait_ready(self, path: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready in {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # The group may outlive its leader (engine core processes): make sure it is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()
        if self in _running:
            _running.remove(self)


def feedloop_server(
    name: str,
    *,
    redis_url: str,
    prefix: str,
    model: str,
    data_dir: Path | None = None,
    adapters_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """`feedloop serve` on a free port, writing to the given Redis under a throw-away key prefix.

    Its data directory defaults to a scratch folder named after the prefix, with the adapters inside it.
    """
    port = free_port()
    data_dir = data_dir or LOGS.parent / prefix
    return Server(
        name,
        [sys.executable, "-m", "services.cli", "serve"],
        {
            "REDIS_URL": redis_url,
            "FEEDLOOP_REDIS_URL": redis_url,
            "FEEDLOOP_REDIS_PREFIX": prefix,
            "FEEDLOOP_DATA_DIR": str(data_dir),
            "FEEDLOOP_ENGINE__MODEL": model,
            "FEEDLOOP_API__PORT": str(port),
            "FEEDLOOP_FEEDBACK__SECRET": f"bench-{prefix}",  # `serve` refuses the documented default
            "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(adapters_dir or data_dir / "adapters"),
            **(env or {}),
        },
        port,
    )


def stop_all() -> None:
    for server in list(_running):
        server.stop()


def install_cleanup() -> None:
    """Stop every started server at exit, on Ctrl-C (KeyboardInterrupt) and on SIGTERM."""
    atexit.register(stop_all)

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    # A shell starts background jobs with SIGINT ignored; make Ctrl-C / kill -INT stop the benchmark anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tiny_model() -> Path:
    from demo.tinymodel import build_tiny_model

    return build_tiny_model(TINY_MODEL)


def model_folder(spec: str | None) -> str:
    """A benchmark's model: a model folder; a packaged model's name (`smollm2-135m-instruct`, or `smollm2` for
    the default one), imported into the data dir on first use as `feedloop serve` does; or (None) the tiny
    test model."""
    if not spec:
        return str(tiny_model())
    if Path(spec).is_dir():
        return spec
    from services.models.catalog import DEFAULT_MODEL, known_model
    from services.models.importer import import_model

    packaged = known_model(DEFAULT_MODEL if spec.strip().lower() == "smollm2" else spec)
    if packaged is None:
        raise SystemExit(f"--model {spec}: neither a folder nor a packaged model name")
    from services.core.config import Settings

    return str(import_model(packaged.name, Settings().models_dir, exist_ok=True).path.resolve())


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, object]:
    return {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": sys.platform}


def result_header(benchmark: str, started: float, load_start: list[float]) -> dict[str, object]:
    """What every result file starts with: the run's time, the machine and its load before and after."""
    return {
        "benchmark": benchmark,
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "load_average_start": load_start,
        "load_average_end": load_average(),
        "machine": machine(),
    }


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def delete_prefix(redis_url: str, prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch.clear()
        if batch:
            deleted += int(client.delete(*batch))
    finally:
        client.close()
    return deleted


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
