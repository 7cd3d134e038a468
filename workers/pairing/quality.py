"""Quality filters for preference pairs. Each filter reports what it dropped and why.

Per-pair filters run when a pair is created (workers/pairing/consumer.py, workers/pairing/generation.py),
after PII masking (workers/pairing/pii.py): empty texts, chosen == rejected, over-long texts. Set-level
filters run when a dataset version is frozen (workers/pairing/datasets.py): exact and near duplicates, the
per-user cap. Counts go to the Redis hash Keys.pairs_stats under the field names built here
(``created:<strategy>``, ``drop:<filter>:<reason>``, ``pii:<kind>``); read_stats() turns the hash back into
numbers for the CLI and the metrics exporter.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from services.core.config import Settings
from workers.pairing.rules import Message, PairRecord, answer_text, normalize_text

log = logging.getLogger(__name__)

# --- stats field names ----------------------------------------------------------------------------------


def created_field(strategy: str) -> str:
    return f"created:{strategy}"


def drop_field(filter_name: str, reason: str) -> str:
    return f"drop:{filter_name}:{reason}"


def pii_field(kind: str) -> str:
    return f"pii:{kind}"


@dataclass
class PairStats:
    created: dict[str, int] = field(default_factory=dict)  # strategy -> pairs stored
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)  # (filter, reason) -> pairs dropped
    pii: dict[str, int] = field(default_factory=dict)  # kind -> values masked

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> PairStats:
        stats = cls()
        for key, value in raw.items():
            name = key.decode() if isinstance(key, bytes) else key
            count = int(value)
            kind, _, rest = name.partition(":")
            if kind == "created":
                stats.created[rest] = count
            elif kind == "drop":
                filter_name, _, reason = rest.partition(":")
                stats.dropped[(filter_name, reason)] = count
            elif kind == "pii":
                stats.pii[rest] = count
        return stats


def read_stats(redis: Any, stats_key: str) -> PairStats:
    """The pairing counters (created by strategy, dropped by filter and reason, PII masked by kind)."""
    return PairStats.from_hash(redis.hgetall(stats_key))


# --- token limits ---------------------------------------------------------------------------------------

_TEMPLATE_TOKENS_PER_MESSAGE = 8  # role marker, separators, end token: generous for chat templates


def _size(message: Message) -> int:
    """UTF-8 bytes of a message's text and of its tool calls (names and arguments)."""
    size = len(message["content"].encode())
    if len(message) > 2 and message.get("tool_calls"):
        size += len(orjson.dumps(message["tool_calls"]))
    return size


class TokenCounter:
    """Counts tokens with the served model's tokenizer, loaded on first need.

    Most texts never need the tokenizer: a byte-level BPE never yields more tokens than UTF-8 bytes, so a
    conversation whose bytes plus a per-message template allowance fit the limit fits. Only longer ones are
    tokenized. If the tokenizer cannot be loaded, a character heuristic (bytes / 3) stands in.
    """

    def __init__(self, model_path: str | None, chat_template: str = "") -> None:
        self.model_path = model_path
        self.chat_template = chat_template  # a template file replacing the tokenizer's (engine.chat_template)
        self._tokenizer: Any = None
        self._loaded = False

    @classmethod
    def for_settings(cls, settings: Settings) -> TokenCounter:
        """Counts as the engine renders: the served model with engine.chat_template when set."""
        return cls(settings.model_path(), settings.engine.chat_template)

    @property
    def tokenizer(self) -> Any:
        if not self._loaded:
            self._loaded = True
            if self.model_path:
                try:
                    from services.core.runtime import load_tokenizer

                    self._tokenizer = load_tokenizer(self.model_path, self.chat_template)
                except Exception as exc:  # any load failure falls back to the heuristic
                    log.warning("tokenizer at %s not loaded (%s); using a character heuristic", self.model_path, exc)
        return self._tokenizer

    def count(self, messages: Sequence[Message]) -> int:
        tokenizer = self.tokenizer
        if tokenizer is None:
            size = sum(_size(m) for m in messages)
            return math.ceil(size / 3) + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages)
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(list(messages), tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return len(ids)
        text = "\n".join(answer_text(m) for m in messages)
        return len(tokenizer(text)["input_ids"]) + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages)

    def fits(self, messages: Sequence[Message], limit: int) -> bool:
        upper_bound = sum(_size(m) for m in messages)
        if upper_bound + _TEMPLATE_TOKENS_PER_MESSAGE * len(messages) <= limit:
            return True
        return self.count(messages) <= limit


# --- per-pair checks ------------------------------------------------------------------------------------


def check_pair(pair: PairRecord, fits: Callable[[Sequence[Message]], bool]) -> tuple[str, str] | None:
    """The (filter, reason) that drops this pair, or None to keep it. A tool-call answer is its text and its
    calls (rules.answer_text): two answers making the same calls are identical, whatever their ids."""
    chosen = answer_text(pair["chosen"][0])
    rejected = answer_text(pair["rejected"][0])
    if not any(m["content"].strip() for m in pair["prompt"]):
        return ("empty", "prompt")
    if not chosen.strip():
        return ("empty", "chosen")
    if not rejected.strip():
        return ("empty", "rejected")
    if normalize_text(chosen) == normalize_text(rejected):
        return ("identical", "chosen_equals_rejected")
    prompt = pair["prompt"]
    if pair.get("tools"):  # the template renders the tool definitions into the prompt: count them as a turn
        prompt = [{"role": "system", "content": orjson.dumps(pair["tools"]).decode()}, *prompt]
    if not fits([*prompt, *pair["chosen"]]):
        return ("length", "chosen_too_long")
    if not fits([*prompt, *pair["rejected"]]):
        return ("length", "rejected_too_long")
    return None


# --- duplicates (set level) -----------------------------------------------------------------------------


def pair_text(pair: Mapping[str, Any]) -> str:
    prompt = " ".join(answer_text(m) for m in pair["prompt"])
    if pair.get("tools"):  # the same conversation offered other tools is another prompt
        prompt += " " + orjson.dumps(pair["tools"], option=orjson.OPT_SORT_KEYS).decode()
    return normalize_text(
        f"{prompt} \x1e {answer_text(pair['chosen'][0])} \x1e {answer_text(pair['rejected'][0])}"
    ).lower()


def exact_key(pair: Mapping[str, Any]) -> str:
    return hashlib.sha256(pair_text(pair).encode()).hexdigest()


_SHINGLE = 5
_NUM_PERM = 64
_rng = np.random.default_rng(20240611)
_PERM_A = (_rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64) * np.uint64(2)) | np.uint64(1)
_PERM_B = _rng.integers(0, 2**63, _NUM_PERM, dtype=np.uint64)
_POLY = np.uint64(1_000_003)


def shingles(text: str) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's character 5-grams (a short text is one shingle)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if codes.size < _SHINGLE:
        codes = np.pad(codes, (0, _SHINGLE - codes.size))
    count = codes.size - _SHINGLE + 1
    hashes = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(_SHINGLE):
            hashes = hashes * _POLY + codes[offset : offset + count]
    return np.unique(hashes)


def minhash(shingle_hashes: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        values = (shingle_hashes[None, :] * _PERM_A[:, None] + _PERM_B[:, None]) >> np.uint64(16)
    return values.min(axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


def _bands(threshold: float) -> tuple[int, int]:
    """(bands, rows) of the LSH index: 8x8 puts the S-curve near 0.77 (fine for thresholds >= 0.8)."""
    return (8, 8) if threshold >= 0.8 else (16, 4)


@dataclass
class FilterResult:
    kept: list[PairRecord]
    dropped: Counter[tuple[str, str]]  # (filter, reason) -> pairs dropped
    dropped_ids: dict[str, tuple[str, str]] = field(default_factory=dict)


def dedupe(pairs: Sequence[PairRecord], threshold: float) -> FilterResult:
    """Drop exact duplicates, then pairs whose shingle Jaccard similarity with an earlier kept pair is at
    least threshold (MinHash + LSH finds candidates, the exact Jaccard decides). Earlier pairs win."""
    dropped: Counter[tuple[str, str]] = Counter()
    dropped_ids: dict[str, tuple[str, str]] = {}
    seen_exact: set[str] = set()
    unique: list[tuple[PairRecord, str]] = []
    for pair in pairs:
        text = pair_text(pair)
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen_exact:
            dropped[("duplicate", "exact")] += 1
            dropped_ids[pair["pair_id"]] = ("duplicate", "exact")
            continue
        seen_exact.add(digest)
        unique.append((pair, text))
    if threshold > 1.0:
        return FilterResult([p for p, _ in unique], dropped, dropped_ids)

    bands, rows = _bands(threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    kept_shingles: dict[int, np.ndarray] = {}
    kept: list[PairRecord] = []
    for pair, text in unique:
        sh = shingles(text)
        signature = minhash(sh)
        band_keys = [signature[b * rows : (b + 1) * rows].tobytes() for b in range(bands)]
        candidates: set[int] = set()
        for band, key in enumerate(band_keys):
            candidates.update(buckets[band].get(key, ()))
        if any(jaccard(sh, kept_shingles[c]) >= threshold for c in sorted(candidates)):
            dropped[("duplicate", "near")] += 1
            dropped_ids[pair["pair_id"]] = ("duplicate", "near")
            continue
        index = len(kept)
        kept.append(pair)
        kept_shingles[index] = sh
        for band, key in enumerate(band_keys):
            buckets[band].setdefault(key, []).append(index)
    return FilterResult(kept, dropped, dropped_ids)


# --- per-user cap (set level) ---------------------------------------------------------------------------


def user_cap_limit(total: int, fraction: float, cap_max: int) -> int:
    """Most pairs one identity may supply to a dataset of total pairs (never below 1)."""
    return max(1, min(cap_max, math.floor(fraction * total)))


def apply_user_cap(pairs: Sequence[PairRecord], fraction: float, cap_max: int) -> tuple[FilterResult, int]:
    """Keep pairs in order while at least one of their identities is under the cap; a kept pair counts
    against every identity in it. An identity flooding votes thus reaches the cap and its own pairs stop,
    while a pair another identity also stands behind can still be kept through that identity's budget."""
    limit = user_cap_limit(len(pairs), fraction, cap_max)
    used: Counter[str] = Counter()
    kept: list[PairRecord] = []
    dropped: Counter[tuple[str, str]] = Counter()
    dropped_ids: dict[str, tuple[str, str]] = {}
    for pair in pairs:
        users = pair.get("users") or ["<anonymous>"]
        if all(used[u] >= limit for u in users):
            dropped[("user_cap", "over_cap")] += 1
            dropped_ids[pair["pair_id"]] = ("user_cap", "over_cap")
            continue
        kept.append(pair)
        for user in users:
            used[user] += 1
    return FilterResult(kept, dropped, dropped_ids), limit


# --- per-answer cap (set level) -------------------------------------------------------------------------


def apply_answer_cap(pairs: Sequence[PairRecord], limit: int) -> FilterResult:
    """Keep same-prompt pairs in order while each of their rated answers is in fewer than limit kept ones (0: no
    cap). A like paired with every disliked answer to its prompt makes one vote many pairs, and a misclick's as
    many; the other strategies pair a rated answer with a written or generated one and are not capped here."""
    if limit <= 0:
        return FilterResult(list(pairs), Counter())
    used: Counter[str] = Counter()
    kept: list[PairRecord] = []
    dropped: Counter[tuple[str, str]] = Counter()
    dropped_ids: dict[str, tuple[str, str]] = {}
    for pair in pairs:
        if pair["strategy"] == "same_prompt":
            answers = pair["completion_ids"]
            if any(used[cid] >= limit for cid in answers):
                dropped[("answer_cap", "over_cap")] += 1
                dropped_ids[pair["pair_id"]] = ("answer_cap", "over_cap")
                continue
            used.update(answers)
        kept.append(pair)
    return FilterResult(kept, dropped, dropped_ids)


# --- per-app cap (set level) ----------------------------------------------------------------------------


def app_of(identity: str) -> str | None:
    """The app an identity speaks for: ``app:user`` (users of an app key) gives app; an address identity
    (``ip:...``) or a user without an app gives None (such identities are bounded by the per-user cap only)."""
    app, sep, rest = identity.partition(":")
    if not sep or not rest or app == "ip":
        return None
    return app


def apply_app_cap(pairs: Sequence[PairRecord], fraction: float) -> tuple[FilterResult, int]:
    """Keep pairs in order while at least one app behind them has supplied fewer than fraction of the pairs
    offered (never below 1), as the per-user cap counts; a kept pair counts against every app in it. Pairs
    whose identities carry no app are never capped here. fraction >= 1 keeps everything."""
    limit = max(1, math.floor(fraction * len(pairs)))
    if fraction >= 1:
        return FilterResult(list(pairs), Counter()), limit
    used: Counter[str] = Counter()
    kept: list[PairRecord] = []
    dropped: Counter[tuple[str, str]] = Counter()
    dropped_ids: dict[str, tuple[str, str]] = {}
    for pair in pairs:
        apps = {a for u in pair.get("users") or [] if (a := app_of(u)) is not None}
        if apps and all(used[a] >= limit for a in apps):
            dropped[("app_cap", "over_cap")] += 1
            dropped_ids[pair["pair_id"]] = ("app_cap", "over_cap")
            continue
        kept.append(pair)
        for app in apps:
            used[app] += 1
    return FilterResult(kept, dropped, dropped_ids), limit


def contributions(rows: Iterable[Mapping[str, Any]], top: int = 20) -> dict[str, dict[str, int]]:
    """Rows (pairs or KTO rows, each with "users") per app and per user: the top entries by count, the
    rest summed under "(other)", so that a report or a metric's label set stays bounded."""
    apps: Counter[str] = Counter()
    users: Counter[str] = Counter()
    for row in rows:
        who = row.get("users") or []
        for app in {app_of(u) or "(none)" for u in who}:
            apps[app] += 1
        for user in set(who):
            users[user] += 1

    def bounded(counts: Counter[str]) -> dict[str, int]:
        head = dict(counts.most_common(top))
        rest = sum(counts.values()) - sum(head.values())
        return {**head, "(other)": rest} if rest else head

    return {"apps": bounded(apps), "users": bounded(users)}
