"""Faults under a real `feedloop serve` (vLLM on CPU, the tiny model) on a private redis-server of its own.

* Redis outage: chat keeps working, /readyz stays ready and reports Redis down in its body, the interaction
  buffer stays bounded (drops counted); the server starts on a Redis whose CONFIG command is disabled.
* Redis back without its data: the replica notices (epoch), counts a data loss, keeps serving the adapter
  it had instead of falling back to the base model, and takes votes again.
* A dead engine core fails /healthz (liveness), so the orchestrator restarts the pod.
* SIGKILL of the API while votes are in flight: every vote answered 202 is in Redis, and the pairs consumer
  processes the stream afterwards without a failure.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import psutil
import pytest
import redis

from services.adapters.registry import AdapterRegistry
from services.core.config import Settings
from services.core.keys import Keys
from tests.conftest import ARTIFACTS, ServerProcess, start_feedloop
from tests.support.adapter_corpus import publish_lora
from tests.support.redis_server import RedisServer, free_port

ADMIN = "faults-admin-token"
SECRET = "faults-feedback-secret"
BUFFER = 20


@dataclass
class Api:
    server: ServerProcess
    redis: RedisServer
    keys: Keys
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.base_url

    def admin(self, method: str, path: str, **kw: object) -> httpx.Response:
        return httpx.request(method, self.url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kw)

    def chat(self, content: str, user: str | None = None, max_tokens: int = 4) -> httpx.Response:
        body: dict[str, object] = {
            "model": "feedloop",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if user:
            body["user"] = user
        return httpx.post(self.url + "/v1/chat/completions", json=body, timeout=60)

    def vote(self, completion: dict, rating: str, user: str, client: httpx.Client | None = None) -> int:
        body = {
            "completion_id": completion["feedback"]["completion_id"],
            "token": completion["feedback"]["token"],
            "rating": rating,
            "user": user,
        }
        return (client or httpx).post(self.url + "/v1/feedback", json=body, timeout=30).status_code

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(self.url + "/metrics", timeout=30).text
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def served(self) -> str | None:
        return self.admin("GET", "/admin/engine").json()["aliases"]["feedloop"]

    def wait(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not within {timeout}s:\n{self.server.log()}")
            time.sleep(0.2)


@pytest.fixture
def start_api(
    redis_server: Callable[..., RedisServer], tiny_model_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Api]]:
    started: list[Api] = []

    def start(*redis_args: str, env: dict[str, str] | None = None) -> Api:
        server = redis_server(*redis_args)
        keys = Keys(f"faults-{uuid.uuid4().hex[:6]}")
        port = free_port()
        full_env = {
            "FEEDLOOP_REDIS_URL": server.url,
            "FEEDLOOP_REDIS_PREFIX": keys.prefix,
            "FEEDLOOP_REDIS_SOCKET_TIMEOUT_S": "1",
            "FEEDLOOP_REDIS_CONNECT_TIMEOUT_S": "1",
            "FEEDLOOP_REDIS_CHECK_INTERVAL_S": "0.5",
            "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
            "FEEDLOOP_ENGINE__MODEL": str(tiny_model_dir),
            "FEEDLOOP_API__PORT": str(port),
            "FEEDLOOP_API__ADMIN_TOKEN": ADMIN,
            "FEEDLOOP_FEEDBACK__SECRET": SECRET,
            "FEEDLOOP_FEEDBACK__RATE_PER_IP": "10000",
            "FEEDLOOP_FEEDBACK__BURST_PER_IP": "100000",
            "FEEDLOOP_INTERACTIONS__MAX_BUFFERED": str(BUFFER),
            "FEEDLOOP_GATE__RECONCILE_INTERVAL_S": "1",
            "FEEDLOOP_TRAINING__ADAPTERS_DIR": str(tmp_path / "adapters"),
            **(env or {}),
        }
        log = ARTIFACTS / "logs" / f"faults-api-{keys.prefix}.log"
        # a generous start: on a loaded CI machine vLLM's start alone can take minutes
        api = Api(start_feedloop(["serve"], full_env, port, log, timeout=900), server, keys, full_env)
        started.append(api)
        return api

    yield start
    for api in started:
        api.server.stop(signal.SIGKILL if api.server.proc.poll() is None else signal.SIGTERM, timeout=30)


def promote_adapter(api: Api, tiny_model_dir: Path) -> str:
    client = api.redis.client()
    registry = AdapterRegistry(client, api.keys)
    # above every version folder on disk: after a data loss the registry's counter starts again at 1
    version = registry.next_version(adapters_dir=api.env["FEEDLOOP_TRAINING__ADAPTERS_DIR"])
    path = publish_lora(tiny_model_dir, Path(api.env["FEEDLOOP_TRAINING__ADAPTERS_DIR"]), version, seed=3)
    registry.register(version, str(path))
    registry.promote(version)
    api.wait(f"{version} served", lambda: api.served() == version)
    return version


def test_redis_outage_and_data_loss_leave_chat_and_the_adapter_alone(start_api, tiny_model_dir: Path) -> None:
    # A managed Redis without CONFIG: the server starts (the eviction check is only a warning then).
    api = start_api("--rename-command", "CONFIG", "", "--maxmemory", "32mb")
    assert "refused CONFIG GET" in api.server.log_path.read_text(errors="replace")
    version = promote_adapter(api, tiny_model_dir)
    ready = httpx.get(api.url + "/readyz", timeout=10).json()
    assert ready["checks"] == {"engine": True, "adapter": True} and ready["redis"]["up"] is True

    # --- Redis full (noeviction refuses writes): a vote is answered 503, never accepted and lost ------
    client = api.redis.client()
    full = api.chat("a question before Redis fills up", user="oom-user").json()
    api.wait("interaction written", lambda: client.exists(api.keys.interaction(full["feedback"]["completion_id"])))
    filler = 0
    try:
        while True:
            client.set(f"filler:{filler}", b"x" * 1_000_000)
            filler += 1
    except redis.exceptions.OutOfMemoryError:
        pass  # noeviction: Redis refuses writes now, but only just (freed buffers bring it back under)
    # a script started under the limit may write past it: Redis ends up megabytes over maxmemory, for good
    client.delete(f"filler:{filler - 1}")
    client.eval("for i = 1, 60 do redis.call('SET', 'filler:lua:' .. i, string.rep('x', 100000)) end", 0)
    assert client.info("memory")["used_memory"] > client.info("memory")["maxmemory"] + 1_000_000
    stream_before = client.xlen(api.keys.feedback_stream) if client.exists(api.keys.feedback_stream) else 0
    assert api.vote(full, "like", "oom-user") == 503
    assert (client.xlen(api.keys.feedback_stream) if client.exists(api.keys.feedback_stream) else 0) == stream_before
    client.delete(*[f"filler:{i}" for i in range(filler)], *[f"filler:lua:{i}" for i in range(1, 61)])
    assert api.vote(full, "like", "oom-user") == 202  # room again: the same vote goes through once
    assert client.xlen(api.keys.feedback_stream) == stream_before + 1

    # --- Redis down: chat goes on, readiness holds, the interaction buffer stays bounded -------------
    dropped_before = api.metric("feedloop_interaction_writes_total", '{outcome="dropped"}')
    api.redis.kill()
    api.wait("Redis reported down", lambda: httpx.get(api.url + "/readyz", timeout=10).json()["redis"]["up"] is False)
    sent = 3 * BUFFER
    answers = [api.chat(f"outage question {i}") for i in range(sent)]
    ok = [a for a in answers if a.status_code == 200]
    assert (sent, len(ok)) == (sent, sent)
    assert {a.json()["system_fingerprint"] for a in ok} == {version}
    probe = httpx.get(api.url + "/readyz", timeout=10)
    assert probe.status_code == 200 and probe.json()["checks"] == {"engine": True, "adapter": True}
    assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200
    assert api.metric("feedloop_redis_up") == 0
    dropped = api.metric("feedloop_interaction_writes_total", '{outcome="dropped"}') - dropped_before
    assert api.metric("feedloop_interaction_write_queue") <= BUFFER
    assert dropped >= sent - BUFFER, dropped
    # a vote while Redis is down is refused with 503, not accepted and lost
    assert api.vote(ok[-1].json(), "like", "nobody") == 503

    # --- Redis back without its data: the epoch changed; the replica keeps its adapter --------------
    api.redis.start()
    api.wait("data loss seen", lambda: api.metric("feedloop_redis_data_loss_total") == 1)
    body = httpx.get(api.url + "/readyz", timeout=10).json()
    assert body["redis"]["up"] is True and body["redis"]["data_losses"] == 1
    assert client.get(api.keys.active_adapter) is None  # the registry is empty ...
    time.sleep(3)  # ... for several reconcile intervals (1 s) ...
    assert api.served() == version  # ... and the replica still serves what it had, not the base model
    after = api.chat("after the restart", user="back-user")
    assert after.status_code == 200 and after.json()["system_fingerprint"] == version

    # votes are taken again, into a stream that Redis recreated
    votes_sent = 5
    completions = [api.chat(f"vote question {i}", user=f"voter-{i}").json() for i in range(votes_sent)]
    statuses = [api.vote(c, "like", f"voter-{i}") for i, c in enumerate(completions)]
    stored = client.xlen(api.keys.feedback_stream)
    assert (statuses.count(202), stored) == (votes_sent, votes_sent)

    # once an operator promotes again, the replica follows the registry as before
    newer = promote_adapter(api, tiny_model_dir)
    assert newer != version and api.served() == newer


def engine_core(api_pid: int) -> psutil.Process:
    """vLLM's engine core: a child process of the API (it names itself VLLM::EngineCore...)."""
    children = psutil.Process(api_pid).children(recursive=True)
    for child in children:
        if "EngineCore" in " ".join(child.cmdline()) or "EngineCore" in child.name():
            return child
    raise AssertionError(f"no engine core under {api_pid}: {[(c.pid, c.name(), c.cmdline()) for c in children]}")


def test_a_dead_engine_core_fails_liveness(start_api) -> None:
    api = start_api()
    assert httpx.get(api.url + "/healthz", timeout=10).status_code == 200
    core = engine_core(api.server.proc.pid)
    os.kill(core.pid, signal.SIGKILL)
    api.wait("/healthz failing", lambda: httpx.get(api.url + "/healthz", timeout=10).status_code == 503, timeout=20)
    assert httpx.get(api.url + "/readyz", timeout=10).status_code == 503
    assert api.chat("anyone there?").status_code >= 500


def test_api_sigkill_mid_vote_keeps_every_acknowledged_vote(start_api, tmp_path: Path) -> None:
    from workers.pairing.consumer import FeedbackConsumer

    # Redis itself stays up here, so the default fsync policy; a 1 s socket timeout would turn one slow
    # fsync on a busy CI disk into a minute of failed handshakes
    api = start_api(
        "--appendonly", "yes", env={"FEEDLOOP_REDIS_SOCKET_TIMEOUT_S": "5", "FEEDLOOP_REDIS_CONNECT_TIMEOUT_S": "5"}
    )  # fmt: skip
    client = api.redis.client()
    users = 120
    completions = []
    for i in range(users):
        response = api.chat(f"kill question {i % 10}", user=f"k-user-{i}", max_tokens=3)
        assert response.status_code == 200
        completions.append(response.json())
    api.wait(
        "interactions written",
        lambda: all(client.exists(api.keys.interaction(c["feedback"]["completion_id"])) for c in completions),
        timeout=180,
    )

    core = engine_core(api.server.proc.pid)
    engine_processes = [core, *core.children(recursive=True)]  # the engine core and its workers
    acknowledged: list[str] = []
    failed: list[str] = []
    lock = threading.Lock()

    def voter(index: int) -> None:
        with httpx.Client(timeout=10) as http:
            for i in range(index, users, 8):
                cid = completions[i]["feedback"]["completion_id"]
                try:
                    status = api.vote(completions[i], "like" if i % 2 else "dislike", f"k-user-{i}", http)
                except httpx.HTTPError:
                    status = 0
                with lock:
                    (acknowledged if status == 202 else failed).append(cid)
                    if len(acknowledged) == users // 3:
                        api.server.proc.send_signal(signal.SIGKILL)  # mid-vote: others are in flight

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    api.server.proc.wait(timeout=30)
    # the engine's processes go with the API (services/engine/vllm_patches.py), not live on holding memory
    _, alive = psutil.wait_procs(engine_processes, timeout=30)
    assert not alive, [(p.pid, p.name()) for p in alive]

    stored = [orjson.loads(f[b"event"])["completion_id"] for _, f in client.xrange(api.keys.feedback_stream)]
    counts = {
        "sent": users,
        "acknowledged": len(acknowledged),
        "stored": len(stored),
        "lost": len(set(acknowledged) - set(stored)),
        "duplicated": len(stored) - len(set(stored)),
    }
    print("API SIGKILL mid-vote:", counts)
    assert counts["acknowledged"] >= users // 3 and failed, counts
    assert counts["lost"] == 0 and counts["duplicated"] == 0, counts

    # whatever the kill left half done, pairing goes through the stream without a failure
    settings = Settings(redis_url=api.redis.url, redis_prefix=api.keys.prefix, engine={"model": str(tmp_path / "x")})
    report = FeedbackConsumer(client, api.keys, settings, name="after-kill").consume(20, until_drained=True)
    assert (report.processed, report.failed, report.dead_lettered) == (len(stored), 0, 0)


def test_local_adapter_failures_are_retried_here_and_only_content_rejects(start_api, tiny_model_dir: Path) -> None:
    import subprocess
    import sys

    from services.adapters.manifest import WEIGHTS_NAME

    api = start_api()
    client = api.redis.client()
    registry = AdapterRegistry(client, api.keys)
    adapters_dir = Path(api.env["FEEDLOOP_TRAINING__ADAPTERS_DIR"])
    failures = lambda: api.metric("feedloop_adapter_swaps_total", '{outcome="failure"}')  # noqa: E731
    rejections = lambda: api.metric("feedloop_adapter_swaps_total", '{outcome="rejected"}')  # noqa: E731

    # --- local: the adapter's folder is not there on this replica (a volume not mounted yet) ---------
    local = registry.next_version(adapters_dir=adapters_dir)
    path = publish_lora(tiny_model_dir, adapters_dir, local, seed=5)
    hidden = path.with_name(f".{local}.unmounted")
    path.rename(hidden)
    registry.register(local, str(path))
    registry.promote(local)
    api.wait("a local failure", lambda: failures() >= 1)
    time.sleep(2)
    assert registry.get(local).status == "active"  # not rejected: other replicas may well have the folder
    assert api.served() is None  # this one keeps serving what it had (the base model)
    hidden.rename(path)  # the volume is mounted: the replica's retry (5 s back-off) loads it
    api.wait(f"{local} served after its retry", lambda: api.served() == local, timeout=60)
    assert registry.get(local).status == "active" and rejections() == 0

    # --- content: a corrupted weights file fails its checksum on every replica: rejected once ---------
    bad = registry.next_version(adapters_dir=adapters_dir)
    path = publish_lora(tiny_model_dir, adapters_dir, bad, seed=6)
    weights = path / WEIGHTS_NAME
    original = weights.read_bytes()
    weights.write_bytes(original[:-8] + bytes(8))
    registry.register(bad, str(path))
    registry.promote(bad)
    api.wait(f"{bad} rejected", lambda: registry.get(bad).status == "rejected")
    record = registry.get(bad)
    assert record.reject_code == "checksum_mismatch" and rejections() == 1
    assert registry.view().active == local and api.served() == local  # reverted; never served

    # --- an operator fixes the file and revalidates: the content checks pass, it is a candidate again --
    cli_env = {**os.environ, **api.env, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "services.cli", "adapters", "revalidate", bad]
    refused = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "checksum" in refused.stdout + refused.stderr  # still corrupt: refused
    weights.write_bytes(original)
    done = subprocess.run(command, env=cli_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert registry.get(bad).status == "candidate"
    registry.promote(bad)
    api.wait(f"{bad} served after revalidation", lambda: api.served() == bad, timeout=60)
    counts = {"versions": 2, "local_failures_retried": int(failures()) >= 1, "rejected": int(rejections())}
    assert counts == {"versions": 2, "local_failures_retried": True, "rejected": 1}, counts
