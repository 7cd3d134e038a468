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


def test_canary_commands_show_promote_and_abort_the_canary(cli_env) -> None:
    client, keys = cli_env
    registry = AdapterRegistry(client, keys)
    v1, v2, v3 = (registry.next_version() for _ in range(3))
    for v in (v1, v2, v3):
        registry.register(v, f"/adapters/{v}")
    registry.promote(v1)
    assert run("adapters", "canary", "status") == (0, f"no canary running; active: {v1}\n")
    code, out = run("adapters", "canary", "promote")
    assert code == 1 and "no canary is running" in out
    registry.promote(v2, auto=True, canary_share=0.1)
    code, out = run("adapters", "canary", "status")
    assert code == 0 and f"canary {v2} on 10% of users vs {v1}" in out and "not checked yet" in out
    code, out = run("adapters", "list")
    assert f"canary: {v2}" in out.splitlines()[0]
    assert any(line.split()[:2] == [v2, "canary"] and f"vs {v1}" in line for line in out.splitlines())
    registry.record_canary_check(v2, {
        "outcome": "continue", "reason": "undecided",
        "canary": {"users": 3, "votes": 7, "like_rate": 0.5}, "active": {"users": 9, "votes": 20, "like_rate": 0.75},
    })  # fmt: skip
    code, out = run("adapters", "canary", "status", "--json")
    status = json.loads(out)
    assert (status["canary"], status["compared_to"], status["latest_check"]["canary"]["votes"]) == (v2, v1, 7)
    code, out = run("adapters", "canary", "status")
    assert "canary  users     3  votes      7  like-rate 0.500" in out
    assert run("adapters", "canary", "promote") == (0, f"{v2}: promoted (previous: {v1})\n")
    assert registry.view().active == v2 and registry.get(v2).canary_outcome == "promoted"  # type: ignore[union-attr]
    registry.promote(v3, auto=True, canary_share=0.1)
    code, out = run("adapters", "canary", "abort", "--reason", "looks off")
    assert code == 0 and out.startswith(f"{v3}: rolled back")
    record = registry.get(v3)
    assert record is not None and (record.status, record.reasons) == ("retired", ["looks off"])
    assert registry.view().active == v2
