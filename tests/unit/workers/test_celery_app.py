"""The Celery app's configuration comes from Settings, lazily; queues, routes and beat are as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from services.core.config import Settings
from workers import celery_app
from workers.pairing.datasets import is_eval, version_name

REPO = Path(__file__).resolve().parents[3]


def test_config_comes_from_settings():
    settings = Settings(redis_url="redis://example:6390/3", redis_prefix="acme")
    app = celery_app.create_app(settings)
    conf = app.conf
    assert conf.broker_url == "redis://example:6390/3"
    assert conf.task_acks_late is True and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == celery_app.VISIBILITY_TIMEOUT_S
    assert conf.broker_transport_options["global_keyprefix"] == "acme:celery:"
    assert {q.name for q in conf.task_queues} == {"pairs", "train"}
    router = app.amqp.router
    assert router.route({}, "pairs.consume")["queue"].name == "pairs"
    assert router.route({}, "train.run")["queue"].name == "train"
    consume = conf.beat_schedule["consume-feedback"]
    assert consume["task"] == "pairs.consume"
    assert consume["schedule"].total_seconds() == settings.pairs.consume_interval_s
    assert "generate-answers" in conf.beat_schedule  # weaker_answer is on by default


def test_no_generation_schedule_without_generation_strategies():
    settings = Settings()
    settings.pairs.strategies = ["same_prompt", "correction"]
    assert set(celery_app.beat_schedule(settings)) == {"consume-feedback", "check-training", "compact-pairs"}
    settings.pairs.retention_s = 0  # keep forever: nothing to compact
    assert set(celery_app.beat_schedule(settings)) == {"consume-feedback", "check-training"}


def test_module_app_reads_settings_only_when_configured():
    code = (
        "import os\n"
        "import workers.celery_app as m\n"
        "assert not m.app.configured\n"
        "os.environ['FEEDLOOP_REDIS_URL'] = 'redis://late-host:6379/7'\n"
        "assert m.app.conf.broker_url == 'redis://late-host:6379/7', m.app.conf.broker_url\n"
        "m.app.loader.import_default_modules()  # what a worker does at start: imports workers.tasks\n"
        "assert {'pairs.consume', 'pairs.generate', 'pairs.snapshot'} <= set(m.app.tasks)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_split_by_pair_id_is_deterministic_and_near_the_fraction():
    ids = [f"pair-{i}" for i in range(5000)]
    held_out = [i for i in ids if is_eval(i, 0.1)]
    assert held_out == [i for i in ids if is_eval(i, 0.1)]
    assert 400 < len(held_out) < 600
    assert not any(is_eval(i, 0.0) for i in ids) and all(is_eval(i, 1.0) for i in ids)
    assert version_name(12) == "ds-000012"


def test_the_canary_check_runs_only_with_a_canary_share():
    settings = Settings(canary={"share": 0.0})
    assert "check-canary" not in celery_app.beat_schedule(settings)  # share 0: straight promotion
    settings.canary.share, settings.canary.check_interval_s = 0.1, 7
    entry = celery_app.beat_schedule(settings)["check-canary"]
    assert (entry["task"], entry["schedule"].total_seconds(), entry["options"]["queue"]) == ("canary.check", 7, "pairs")
