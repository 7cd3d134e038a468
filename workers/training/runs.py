"""Training run records in Redis: one hash per run (Keys.run), indexed by creation time (Keys.runs_index).

Status: ``queued`` (claimed by the trigger, task sent) -> ``running`` (a worker holds the lease) -> one of
``promoted`` (gate passed, now active), ``gated`` (gate passed, left a candidate: auto-promotion off or
pinned), ``rejected`` (gate failed; registered as rejected), ``failed`` (an error, or the worker was lost).
Dict and list fields are stored as JSON; the per-step training metrics go to a list (Keys.run_history).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redis import Redis

from services.core.counters import highest_on_disk, next_number
from services.core.keys import Keys

TERMINAL = frozenset({"promoted", "canary", "gated", "rejected", "failed"})
ACTIVE = frozenset({"queued", "running"})
_JSON_FIELDS = ("gate", "metrics", "timings", "reasons", "trigger", "dataset")
_FLOAT_FIELDS = ("created_at", "queued_at", "started_at", "finished_at")

# KEYS: current slot. ARGV: run id.
_RELEASE_SLOT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def encode(fields: dict[str, Any]) -> dict[str, str]:
    """Hash values: JSON for dicts and lists, repr for floats, str otherwise (None becomes '')."""
    out = {}
    for name, value in fields.items():
        if isinstance(value, dict | list):
            out[name] = json.dumps(value)
        elif isinstance(value, float):
            out[name] = repr(value)
        else:
            out[name] = "" if value is None else str(value)
    return out


def decode(raw: dict[Any, Any]) -> dict[str, Any]:
    fields = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()
    }
    record: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _JSON_FIELDS:
            record[name] = json.loads(value) if value else None
        elif name in _FLOAT_FIELDS:
            record[name] = float(value) if value else None
        elif name == "token":
            record[name] = int(value) if value else None
        else:
            record[name] = value or None
    return record


class RunStore:
    def __init__(self, redis: Redis, keys: Keys, runs_dir: Path | None = None) -> None:
        """runs_dir: where runs write their folders (<data_dir>/runs); its run-N names are never reused."""
        self.redis = redis
        self.keys = keys
        self.runs_dir = runs_dir
        self._release_slot = redis.register_script(_RELEASE_SLOT)

    def next_run_id(self) -> str:
        """The next run number, above every run-N folder on disk (Redis may have lost its counter)."""
        floor = highest_on_disk([self.runs_dir], r"run-(\d+)")
        return f"run-{next_number(self.redis, self.keys.runs_seq, floor)}"

    def get(self, run_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.keys.run(run_id))
        return decode(raw) if raw else None

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest runs first."""
        ids: Any = self.redis.zrevrange(self.keys.runs_index, 0, limit - 1)
        runs = (self.get(i.decode() if isinstance(i, bytes) else i) for i in ids)
        return [r for r in runs if r is not None]

    def history(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.redis.lrange(self.keys.run_history(run_id), 0, -1)]

    def update(self, run_id: str, fields: dict[str, Any]) -> None:
        """An unfenced write: only for runs no worker holds (the trigger, before a lease exists)."""
        self.redis.hset(self.keys.run(run_id), mapping=encode(fields))  # type: ignore[arg-type]

    def current(self) -> str | None:
        value = self.redis.get(self.keys.current_run)
        return value.decode() if isinstance(value, bytes) else value

    def release_slot(self, run_id: str) -> bool:
        return bool(self._release_slot(keys=[self.keys.current_run], args=[run_id]))

    def training_state(self) -> dict[str, str]:
        raw = self.redis.hgetall(self.keys.training_state)
        return {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
