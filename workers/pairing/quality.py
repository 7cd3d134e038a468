"""Quality filters for preference pairs. Each filter reports what it dropped and why.

Per-pair filters run when a pair is created (workers/pairing/consumer.py, workers/pairing/generation.py): PII scrubbing,
empty texts, chosen == rejected, over-long texts. Set-level filters run when a dataset version is frozen
(workers/pairing/datasets.py): exact and near duplicates, the per-user cap. Counts go to the Redis hash
Keys.pairs_stats under the field names built here (``created:<strategy>``, ``drop:<filter>:<reason>``,
``pii:<kind>``); read_stats() turns the hash back into numbers for the CLI and the metrics exporter.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import orjson

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


# --- PII scrubbing --------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
)
_IPV6_CANDIDATE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD_CANDIDATE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_PHONE_CANDIDATE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w])"
    r"|(?<![\w+])\+\d{8,15}(?!\w)"
)
_ISO_DATE = re.compile(r"^\d{4}[-./]\d{1,2}[-./]\d{1,2}$")
_DIGIT_RUN = re.compile(r"\d[\d\s().+-]{5,}\d")  # IPv4, cards and phones all contain one
_HEX_COLON = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]|::")  # every IPv6 address contains one


def _maybe_pii(text: str) -> bool:
    """Cheap test that every text holding any of the patterns passes: most texts stop here."""
    return "@" in text or (":" in text and _HEX_COLON.search(text) is not None) or _DIGIT_RUN.search(text) is not None


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_cards(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            counts["card"] += 1
            return "[CARD]"
        return match.group()

    return _CARD_CANDIDATE.sub(replace, text)


def _mask_phones(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = match.group()
        digits = sum(c.isdigit() for c in value)
        groups = len(re.findall(r"\d+", value))
        looks_like_phone = value.startswith("+") or "(" in value or groups >= 3 or digits >= 10
        if 7 <= digits <= 15 and looks_like_phone and not _ISO_DATE.match(value):
            counts["phone"] += 1
            return "[PHONE]"
        return value

    return _PHONE_CANDIDATE.sub(replace, text)


def _mask_ipv6(text: str, counts: Counter[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = match.group()
        if sum(c not in ":" for c in value) < 3:
            return value
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return value
        counts["ip"] += 1
        return "[IP]"

    return _IPV6_CANDIDATE.sub(replace, text)


def scrub_pii(text: str, counts: Counter[str] | None = None) -> tuple[str, Counter[str]]:
    """Mask e-mail addresses, IPs, Luhn-valid card numbers and phone numbers; count what was masked."""
    counts = counts if counts is not None else Counter()
    if not _maybe_pii(text):
        return text, counts

    def mask(pattern: re.Pattern[str], label: str, kind: str) -> Callable[[str], str]:
        def run(value: str) -> str:
            result, n = pattern.subn(label, value)
            if n:
                counts[kind] += n
            return result

        return run

    if "@" in text:
        text = mask(_EMAIL, "[EMAIL]", "email")(text)
    text = mask(_IPV4, "[IP]", "ip")(text)
    if ":" in text:
        text = _mask_ipv6(text, counts)
    text = _mask_cards(text, counts)
    text = _mask_phones(text, counts)
    return text, counts


@lru_cache(maxsize=8192)
def _scrubbed(text: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """scrub_pii memoized: the same prompts and responses recur across many pairs."""
    out, counts = scrub_pii(text)
    return out, tuple(counts.items())


def _scrub_text(text: str, counts: Counter[str]) -> str:
    out, found = _scrubbed(text)
    for kind, n in found:
        counts[kind] += n
    return out


def _scrub_json(value: Any, counts: Counter[str]) -> Any:
    """Every string in a JSON value scrubbed (keys and numbers kept: the value stays valid JSON)."""
    if isinstance(value, str):
        return _scrub_text(value, counts)
    if isinstance(value, list):
        return [_scrub_json(item, counts) for item in value]
    if isinstance(value, dict):
        return {key: _scrub_json(item, counts) for key, item in value.items()}
    return value


def _scrub_calls(calls: list[dict[str, Any]], counts: Counter[str]) -> list[dict[str, Any]]:
    """Tool calls with the strings inside their arguments scrubbed (arguments that are not JSON as text)."""
    scrubbed = []
    for call in calls:
        function = call["function"]
        arguments = function["arguments"]
        if isinstance(arguments, str):
            try:
                arguments = orjson.dumps(_scrub_json(orjson.loads(arguments), counts)).decode()
            except orjson.JSONDecodeError:
                arguments = _scrub_text(arguments, counts)
        else:
            arguments = _scrub_json(arguments, counts)
        scrubbed.append({**call, "function": {**function, "arguments": arguments}})
    return scrubbed


def scrub_messages(messages: Iterable[Message], counts: Counter[str]) -> list[Message]:
    scrubbed = []
    for m in messages:
        text, found = _scrubbed(m["content"])
        for kind, n in found:
            counts[kind] += n
        message = {"role": m["role"], "content": text}
        if len(m) > 2:  # a tool-calling turn: its calls (arguments scrubbed too) and tool_call_id stay
            message.update((key, value) for key, value in m.items() if key not in message)
            if m.get("tool_calls"):
                message["tool_calls"] = _scrub_calls(m["tool_calls"], counts)
        scrubbed.append(message)
    return scrubbed


def scrub_pair(pair: PairRecord) -> Counter[str]:
    """Scrub a pair's prompt, chosen and rejected texts in place; return what was masked."""
    counts: Counter[str] = Counter()
    pair["prompt"] = scrub_messages(pair["prompt"], counts)
    pair["chosen"] = scrub_messages(pair["chosen"], counts)
    pair["rejected"] = scrub_messages(pair["rejected"], counts)
    return counts


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

    def __init__(self, model_path: str | None) -> None:
        self.model_path = model_path
        self._tokenizer: Any = None
        self._loaded = False

    @property
    def tokenizer(self) -> Any:
        if not self._loaded:
            self._loaded = True
            if self.model_path:
                try:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
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
