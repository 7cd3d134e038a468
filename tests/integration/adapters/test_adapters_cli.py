"""`feedloop adapters ...` and `feedloop train` against a real Redis (DB 15, a key prefix per test)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from services.adapters.registry import AdapterRegistry
from services.cli.main import app
from services.core.config import get_settings
from services.core.keys import Keys
from workers.training.runs import RunStore

REDIS_URL = os.environ.get("FEEDLOOP_CLI_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[redis.Redis, Keys]]:
    prefix = f"cli-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FEEDLOOP_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("FEEDLOOP_REDIS_PREFIX", prefix)
    monkeypatch.setenv("FEEDLOOP_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FEEDLOOP_PAIRS__DATA_DIR", str(tmp_path / "datasets"))
    monkeypatch.setenv("FEEDLOOP_ENGINE__MODEL", str(tmp_path / "no-model"))
    get_settings.cache_clear()
    client = redis.Redis.from_url(REDIS_URL)
    yield client, Keys(prefix)
    get_settings.cache_clear()
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_adapters_commands_drive_the_registry(cli_env) -> None:
    client, keys = cli_env
    registry = AdapterRegistry(client, keys)
    v1, v2 = registry.next_version(), registry.next_version()
    for v in (v1, v2):
        registry.register(v, f"/adapters/{v}", dataset_version="ds-000001")

    assert run("adapters", "promote", v1) == (0, f"{v1}: promoted\n")
    code, out = run("adapters", "promote", v2)
    assert code == 0 and f"previous: {v1}" in out
    code, out = run("adapters", "list")
    assert code == 0 and f"active: {v2}  previous: {v1}  auto-promotion on" in out
    assert any(line.split()[:2] == [v1, "previous"] for line in out.splitlines())

    assert run("adapters", "rollback")[0] == 0 and registry.view().active == v1
    code, out = run("adapters", "rollback")
    assert code == 1 and "no previous version" in out
    assert run("adapters", "pin", v2)[0] == 0
    code, out = run("adapters", "list", "--json")
    listing = json.loads(out)
    assert (listing["active"], listing["pinned"], listing["auto_promotion"]) == (v2, v2, False)
    assert run("adapters", "unpin") == (0, f"unpinned {v2}\n")
    code, out = run("adapters", "promote", "feedloop-v404")
    assert code == 1 and "no adapter version" in out


def test_train_shows_the_trigger_and_train_now_refuses_a_second_run(cli_env) -> None:
    client, keys = cli_env
    client.zadd(keys.pairs_index, {f"pair-{i}": i for i in range(3)})
    code, out = run("train")
    assert code == 0 and "trigger: waits (waiting_for_pairs); 3 new pairs" in out

    # --now runs here: with no real pairs stored the snapshot has nothing, and the run fails visibly.
    code, out = run("train", "--now")
    assert code == 1 and "nothing to snapshot" in out
    runs = RunStore(client, keys)
    (failed,) = runs.recent()
    assert failed["status"] == "failed" and runs.current() is None and not client.exists(keys.training_lease)

    client.set(keys.current_run, "run-99")  # a run in progress
    client.hset(keys.run("run-99"), mapping={"run_id": "run-99", "status": "queued", "queued_at": "1e18"})
    code, out = run("train", "--now")
    assert code == 1 and "run_in_progress run-99" in out
