"""Retention of the pairing state: what the pairs worker keeps in Redis per rated completion and per pair is
bounded by age, so Redis memory levels off under steady traffic.

Kept for ``pairs.retention_s`` after a completion's first majority label (default 90 days): its pairing
record and votes, its place in its prompt group (the liked/disliked sets future votes pair against), its
generation candidacy, and the pairs made from votes of that age. Nothing a future vote needs is removed:
a vote needs its completion's feedback token, which expires after ``feedback.token_ttl_s``, so the
retention is never shorter than that (plus a day). Pairs removed here drop out of *future* dataset
versions; every version already snapshotted keeps them in its files on disk.

``compact()`` runs from beat (task ``pairs.compact``, every ``pairs.compact_interval_s``). It reads the
oldest entries first and stops at the first one young enough, so a pass costs what it deletes.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis import Redis

from services.core.config import Settings
from services.core.keys import Keys

_CHUNK = 1000
_DAY_S = 24 * 3600


def retention_s(settings: Settings) -> int:
    """The effective retention (0: keep forever); never shorter than a feedback token's life plus a day."""
    configured = settings.pairs.retention_s
    return 0 if configured <= 0 else max(configured, settings.feedback.token_ttl_s + _DAY_S)


def compact(redis: Redis, keys: Keys, settings: Settings, now: float | None = None) -> dict[str, int]:
    """Delete pairing state and pairs older than the retention; returns what was removed."""
    keep_s = retention_s(settings)
    removed = {"completions": 0, "pairs": 0}
    if keep_s == 0:
        return removed
    cutoff = (time.time() if now is None else now) - keep_s
    removed["completions"] = _compact_completions(redis, keys, cutoff)
    removed["pairs"] = _compact_pairs(redis, keys, cutoff)
    return removed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _compact_completions(redis: Redis, keys: Keys, cutoff: float) -> int:
    total = 0
    strategies = ("weaker_answer", "stronger_answer")
    while True:
        ids: Any = redis.zrangebyscore(keys.labeled_completions, "-inf", f"({cutoff}", start=0, num=_CHUNK)
        if not ids:
            return total
        cids = [_text(i) for i in ids]
        records = redis.mget([keys.pairing_completion(c) for c in cids])
        pipe = redis.pipeline(transaction=False)
        for cid, raw in zip(cids, records, strict=True):
            if raw:
                phash = orjson.loads(raw).get("prompt_hash")
                if phash:
                    pipe.hdel(keys.prompt_group(phash), cid)
                    pipe.zrem(keys.prompt_liked(phash), cid)
                    pipe.zrem(keys.prompt_disliked(phash), cid)
            pipe.delete(keys.pairing_completion(cid), keys.pairing_votes(cid))
            for strategy in strategies:
                pipe.zrem(keys.pairing_candidates(strategy), cid)
                pipe.hdel(keys.pairing_attempts, f"{strategy}:{cid}")
        pipe.zrem(keys.labeled_completions, *cids)
        pipe.execute()
        total += len(cids)
        if len(cids) < _CHUNK:
            return total


def _compact_pairs(redis: Redis, keys: Keys, cutoff: float) -> int:
    """Pairs in creation order (their index score): delete from the oldest while they are older than cutoff."""
    total = 0
    while True:
        rows: Any = redis.zrange(keys.pairs_index, 0, _CHUNK - 1)
        if not rows:
            return total
        pids = [_text(r) for r in rows]
        raws = redis.mget([keys.pair(p) for p in pids])
        old: list[str] = []
        young_seen = False
        for pid, raw in zip(pids, raws, strict=True):
            created = orjson.loads(raw).get("created_at", 0.0) if raw else 0.0  # a dangling index entry: drop
            if created >= cutoff:
                young_seen = True
                break
            old.append(pid)
        if old:
            pipe = redis.pipeline(transaction=False)
            pipe.delete(*[keys.pair(p) for p in old])
            pipe.zrem(keys.pairs_index, *old)
            pipe.execute()
            total += len(old)
        if young_seen or len(pids) < _CHUNK:
            return total
