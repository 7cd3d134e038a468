"""Dataset versions: freeze the current pairs into an immutable, exported snapshot.

snapshot() takes every pair stored up to now (by creation sequence), keeps those whose votes still hold
(pairing.pair_is_live: superseded pairs are excluded here, not deleted), applies the set-level filters
(duplicates, per-user cap), splits train/eval by a hash of the pair id (see eval_threshold: a pair trained
on is never held out later), and writes ``<data_dir>/<version>/`` with train.jsonl and eval.jsonl (TRL conversational
preference format), kto.jsonl (unpaired thumbs) and manifest.json. The folder is built under a temporary
name, every file fsynced, then renamed into place, so a version folder is either complete or absent. The
manifest is also stored in Redis (Keys.dataset(version), indexed in Keys.datasets_index).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from redis import Redis

from services.core import metrics
from services.core.config import PairsSettings, Settings
from services.core.counters import highest_on_disk, next_number
from services.core.durable import atomic_folder
from services.core.keys import Keys
from services.core.redis_lock import redis_lock
from services.feedback.events import answer_message
from workers.pairing import consensus, quality
from workers.pairing import rules as pairing
from workers.pairing import store as pairs_store
from workers.pairing.pii import scrub_messages
from workers.pairing.store import PairsStore

TRAIN_FILE, EVAL_FILE, KTO_FILE, MANIFEST_FILE = "train.jsonl", "eval.jsonl", "kto.jsonl", "manifest.json"


class SnapshotError(RuntimeError):
    pass


def version_name(number: int) -> str:
    return f"ds-{number:06d}"


def eval_bucket(pid: str) -> float:
    """The pair id's hash as a number in [0, 1): pairs below the eval threshold are held out."""
    return int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0x1_0000_0000


def is_eval(pid: str, eval_fraction: float) -> bool:
    """Deterministic split: the pair id's hash decides, so a pair stays on its side while the threshold does."""
    return eval_bucket(pid) < eval_fraction


def eval_threshold(
    pair_ids: Iterable[str], fraction: float, min_pairs: int, max_fraction: float, previous: float | None
) -> float:
    """The hash bucket below which a pair is held out for the gate.

    ``fraction`` (pairs.eval_fraction) always; raised, while that holds out fewer than ``min_pairs``
    (pairs.min_eval_pairs), to hold out the ``min_pairs`` pairs with the smallest buckets, but never above
    ``max_fraction`` nor above the previous version's threshold (``previous``; None for the first version).
    So the threshold only falls as data grows: held-out pairs may move to training in a later version,
    never the other way round, and an adapter is never gated on pairs it (or its parent) was trained on.
    """
    buckets = sorted(eval_bucket(pid) for pid in pair_ids)
    if min_pairs <= 0 or not buckets or sum(bucket < fraction for bucket in buckets) >= min_pairs:
        return fraction
    raised = min(math.nextafter(buckets[min(min_pairs, len(buckets)) - 1], 1.0), max_fraction)
    if previous is not None:
        raised = min(raised, previous)
    return max(fraction, raised)


def previous_eval_threshold(redis: Redis, keys: Keys) -> float | None:
    """The latest version's eval threshold (its eval_fraction for versions made before thresholds were kept)."""
    version = latest_version(redis, keys)
    if version is None:
        return None
    manifest = load_manifest(redis, keys, version)
    return float(manifest.get("eval_threshold", manifest.get("eval_fraction", 0.0)))


def trl_messages(messages: list[pairing.Message]) -> list[pairing.Message]:
    """Messages as TRL and transformers' chat templates take them: a tool call's ``arguments`` as an object,
    not OpenAI's JSON string (vLLM converts them the same way before rendering); arguments that are not a
    JSON object stay a string. Plain messages are returned as they are."""
    if all(len(m) <= 2 for m in messages):
        return messages
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_trl_call(call) for call in m["tool_calls"]]}
        out.append(m)
    return out


def _trl_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call["function"]
    arguments = function["arguments"]
    if isinstance(arguments, str):
        try:
            parsed = orjson.loads(arguments) if arguments.strip() else {}
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
    return {**call, "function": {**function, "arguments": arguments}}


def dpo_row(pair: Mapping[str, Any]) -> dict[str, Any]:
    """A pair in TRL's conversational preference format; a tool-calling pair also has its ``tools`` and
    keeps each answer's ``tool_calls`` (TRL renders both through the chat template)."""
    row = {
        "prompt": trl_messages(pair["prompt"]),
        "chosen": trl_messages(pair["chosen"]),
        "rejected": trl_messages(pair["rejected"]),
        "pair_id": pair["pair_id"],
    }
    if pair.get("tools"):
        row["tools"] = pair["tools"]
    return row


def kto_rows(
    store: PairsStore, fits: Any, settings: Settings | None = None, unreliable: frozenset[str] = frozenset()
) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]]]:
    """One unpaired example per completion whose majority is currently like or dislike, with the same
    guards as the pairs: PII masked, the unreliable voters' labels left out, exact and near duplicates
    dropped, the per-user and per-app caps (settings None: PII and length checks only). Each row carries
    "users" (dropped when written)."""
    rows: list[dict[str, Any]] = []
    dropped: Counter[tuple[str, str]] = Counter()
    newest = settings.pairs.max_version_pairs if settings is not None else 0
    labeled = [(record, label) for record, label in store.labeled_completions(newest=newest) if label is not None]
    voters: list[list[str]] = []
    for start in range(0, len(labeled), 2000):
        chunk = labeled[start : start + 2000]
        voters += store.labeled_voters([r["completion_id"] for r, _ in chunk], [label for _, label in chunk])
    for (record, label), users in zip(labeled, voters, strict=True):
        if unreliable and not unreliable.isdisjoint(users):
            dropped[(consensus.FILTER, "unreliable_voter")] += 1
            continue
        pii: Counter[str] = Counter()
        prompt = scrub_messages(record["prompt"], pii)
        answer = answer_message(record["response"], record.get("tool_calls"), record.get("content"))
        completion = scrub_messages([answer], pii)
        if not pairing.answer_text(completion[0]).strip():
            dropped[("empty", "completion")] += 1
            continue
        if not fits([*prompt, *completion]):
            dropped[("length", "completion_too_long")] += 1
            continue
        row = {"prompt": trl_messages(prompt), "completion": trl_messages(completion), "label": label == "like"}
        if record.get("tools"):
            row["tools"] = record["tools"]
        rows.append({**row, "users": users})
    if settings is None or not rows:
        return rows, dropped
    cfg = settings.pairs
    # the set-level filters work on pairs: a KTO row is a "pair" of its completion and its label
    as_pairs = [
        {
            "pair_id": str(i),
            "prompt": row["prompt"],
            "chosen": row["completion"],
            "rejected": [{"role": "assistant", "content": "like" if row["label"] else "dislike"}],
            "users": row["users"],
            "tools": row.get("tools"),
        }
        for i, row in enumerate(rows)
    ]
    deduped = quality.dedupe(as_pairs, cfg.near_duplicate_threshold)  # type: ignore[arg-type]
    capped, _ = quality.apply_user_cap(deduped.kept, cfg.user_cap_fraction, cfg.user_cap_max)
    by_app, _ = quality.apply_app_cap(capped.kept, cfg.app_cap_fraction)
    dropped.update(deduped.dropped)
    dropped.update(capped.dropped)
    dropped.update(by_app.dropped)
    return [rows[int(p["pair_id"])] for p in by_app.kept], dropped


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    digest = hashlib.sha256()
    count = 0
    with open(path, "wb") as handle:
        for row in rows:
            line = orjson.dumps(row) + b"\n"
            digest.update(line)
            handle.write(line)
            count += 1
    return {"rows": count, "sha256": digest.hexdigest()}


def _entry_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() else (0, 0)


def next_version(redis: Redis, keys: Keys, data_dir: Path) -> str:
    """The next version name, above every ds-N folder in data_dir (finished or interrupted): a Redis that
    lost its counter never hands out a version whose folder exists."""
    return version_name(next_number(redis, keys.datasets_seq, highest_on_disk([data_dir], r"ds-(\d+)")))


def snapshot(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    """Freeze the current pairs into the next dataset version; return its manifest."""
    with redis_lock(redis, keys.snapshot_lock, 15 * 60 * 1000) as held:
        if not held:
            raise SnapshotError("another snapshot is running")
        return _snapshot(redis, keys, settings)


def consensus_filter(
    store: PairsStore, pairs: list[pairing.PairRecord], cfg: PairsSettings
) -> tuple[quality.FilterResult, frozenset[str]]:
    """consensus.apply_consensus with the prompt groups the pairs come from, read from the store; also the
    voters left out as unreliable."""
    labels = store.prompt_group_labels({p["prompt_hash"] for p in pairs})
    cids = [cid for group in labels.values() for cid in group]
    records: dict[str, dict[str, Any]] = {}
    cast: dict[str, list[tuple[str, str]]] = {}
    group_votes: dict[str, list[consensus.Vote]] = {}
    for start in range(0, len(cids), 5000):
        for cid, (record, votes) in store.completions_with_votes(cids[start : start + 5000]).items():
            records[cid] = record
            cast[cid] = list(pairs_store.ratings(votes))
            group_votes.setdefault(record.get("prompt_hash") or "", []).extend(
                consensus.answer_votes(record, cast[cid])
            )
    unreliable = consensus.peel_unreliable_voters(group_votes.values(), cfg.voter_flip_odds)
    similarity = cfg.consensus_similarity
    groups = {
        ph: consensus.group_answers(consensus.without_voters(group, cast, unreliable), records, similarity)
        for ph, group in labels.items()
    }
    return consensus.apply_consensus(pairs, groups, cfg.label_noise_rate, unreliable), unreliable


def _snapshot(redis: Redis, keys: Keys, settings: Settings) -> dict[str, Any]:
    cfg = settings.pairs
    store = PairsStore(redis, keys)
    tokens = quality.TokenCounter.for_settings(settings)

    def fits(messages: list[pairing.Message]) -> bool:
        return tokens.fits(messages, cfg.max_tokens)

    max_seq = store.max_seq()
    min_seq = store.newest_seq_from(max_seq, cfg.max_version_pairs)
    pairs = [pair for _, pair in store.iter_pairs(min_seq=min_seq, max_seq=max_seq)]
    labels, corrections = store.live_state(pairs)
    live = [p for p in pairs if pairing.pair_is_live(p, labels, corrections)]
    filters: Counter[tuple[str, str]] = Counter()
    if len(live) < len(pairs):
        filters[("superseded", "votes_changed")] = len(pairs) - len(live)
    agreed, unreliable = live, frozenset[str]()
    if cfg.consensus:
        checked, unreliable = consensus_filter(store, live, cfg)
        filters.update(checked.dropped)
        agreed = checked.kept
    deduped = quality.dedupe(agreed, cfg.near_duplicate_threshold)
    filters.update(deduped.dropped)
    per_answer = quality.apply_answer_cap(deduped.kept, cfg.max_pairs_per_answer)
    filters.update(per_answer.dropped)
    capped, cap = quality.apply_user_cap(per_answer.kept, cfg.user_cap_fraction, cfg.user_cap_max)
    filters.update(capped.dropped)
    by_app, app_cap = quality.apply_app_cap(capped.kept, cfg.app_cap_fraction)
    filters.update(by_app.dropped)
    capped = by_app
    kept = capped.kept
    kto, kto_dropped = kto_rows(store, fits, settings, unreliable)
    if not kept and not kto:
        raise SnapshotError(f"nothing to snapshot ({len(pairs)} pairs stored, none kept)")

    threshold = eval_threshold(
        (p["pair_id"] for p in kept),
        cfg.eval_fraction,
        cfg.min_eval_pairs,
        cfg.max_eval_fraction,
        previous_eval_threshold(redis, keys),
    )
    train = [dpo_row(p) for p in kept if not is_eval(p["pair_id"], threshold)]
    evaluation = [dpo_row(p) for p in kept if is_eval(p["pair_id"], threshold)]
    version = next_version(redis, keys, Path(cfg.data_dir))
    entry_ids = sorted((p.get("entry_id") or "" for p in kept if p.get("entry_id")), key=_entry_key)

    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    target = data_dir / version
    if target.exists():
        raise SnapshotError(f"{target} already exists (dataset versions are immutable)")
    try:
        with atomic_folder(target) as tmp:
            files = {
                TRAIN_FILE: _write_jsonl(tmp / TRAIN_FILE, train),
                EVAL_FILE: _write_jsonl(tmp / EVAL_FILE, evaluation),
                KTO_FILE: _write_jsonl(tmp / KTO_FILE, ({k: v for k, v in r.items() if k != "users"} for r in kto)),
            }
            manifest = {
                "version": version,
                "created_at": time.time(),
                "path": str(target.resolve()),
                "pairs_seq_max": max_seq,
                "max_version_pairs": cfg.max_version_pairs,
                "counts": {
                    "stored": len(pairs),
                    "live": len(live),
                    "kept": len(kept),
                    "train": len(train),
                    "eval": len(evaluation),
                    "kto": len(kto),
                    "kto_desirable": sum(1 for r in kto if r["label"]),
                    "kto_undesirable": sum(1 for r in kto if not r["label"]),
                },
                "strategies": dict(Counter(p["strategy"] for p in kept)),
                "filters": {f"{name}:{reason}": n for (name, reason), n in sorted(filters.items())},
                "unreliable_voters": len(unreliable),
                "kto_filters": {f"{name}:{reason}": n for (name, reason), n in sorted(kto_dropped.items())},
                "user_cap": cap,
                "app_cap": app_cap if cfg.app_cap_fraction < 1 else None,
                "users": len({u for p in kept for u in p.get("users", [])}),
                # pairs and KTO rows per app and per user (the top 20 of each, the rest under "(other)")
                "contributions": quality.contributions(kept),
                "kto_contributions": quality.contributions(kto),
                "feedback": {
                    "ids": len({f for p in kept for f in p["feedback_ids"]}),
                    "first_entry_id": entry_ids[0] if entry_ids else None,
                    "last_entry_id": entry_ids[-1] if entry_ids else None,
                },
                "eval_fraction": cfg.eval_fraction,
                "eval_threshold": threshold,
                "near_duplicate_threshold": cfg.near_duplicate_threshold,
                "files": files,
            }
            (tmp / MANIFEST_FILE).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    except FileExistsError as error:  # another snapshot took this version meanwhile
        raise SnapshotError(str(error)) from error

    metrics.set_dataset_pairs_by_app(quality.contributions(kept)["apps"])
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.dataset(version), orjson.dumps(manifest))
    pipe.zadd(keys.datasets_index, {version: int(version.split("-")[1])})
    for (name, reason), n in filters.items():
        pipe.hincrby(keys.pairs_stats, quality.drop_field(name, reason), n)
    pipe.execute()
    return manifest


# --- reading versions back ------------------------------------------------------------------------------


def list_versions(redis: Redis, keys: Keys) -> list[str]:
    versions: Any = redis.zrange(keys.datasets_index, 0, -1)
    return [v.decode() if isinstance(v, bytes) else v for v in versions]


def latest_version(redis: Redis, keys: Keys) -> str | None:
    versions: Any = redis.zrange(keys.datasets_index, -1, -1)
    if not versions:
        return None
    return versions[0].decode() if isinstance(versions[0], bytes) else versions[0]


def load_manifest(redis: Redis, keys: Keys, version: str) -> dict[str, Any]:
    raw = redis.get(keys.dataset(version))
    if raw is None:
        raise SnapshotError(f"unknown dataset version {version!r}")
    return orjson.loads(raw)


def count_new_pairs(redis: Redis, keys: Keys, since_version: str | None) -> int:
    """Pairs stored after dataset version since_version was frozen (all pairs when None). Counts stored
    pairs; a few may later be superseded or filtered out at the next snapshot."""
    store = PairsStore(redis, keys)
    if since_version is None:
        return int(redis.zcard(keys.pairs_index))
    return store.count_since(int(load_manifest(redis, keys, since_version)["pairs_seq_max"]))


def dataset_files(redis: Redis, keys: Keys, version: str) -> Path:
    return Path(load_manifest(redis, keys, version)["path"])


def export(redis: Redis, keys: Keys, version: str, fmt: str, out: Path, split: str = "all") -> int:
    """Copy one version's rows in format fmt (dpo: train/eval pairs, kto: unpaired thumbs) to out
    (atomically); returns the rows written."""
    folder = dataset_files(redis, keys, version)
    if fmt == "dpo":
        sources = {"train": [TRAIN_FILE], "eval": [EVAL_FILE], "all": [TRAIN_FILE, EVAL_FILE]}[split]
    elif fmt == "kto":
        sources = [KTO_FILE]
    else:
        raise ValueError(f"unknown format {fmt!r} (dpo or kto)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    rows = 0
    with open(tmp, "wb") as handle:
        for name in sources:
            with open(folder / name, "rb") as source:
                for line in source:
                    handle.write(line)
                    rows += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return rows
