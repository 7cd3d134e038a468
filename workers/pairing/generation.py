"""Generation-based pairs (weaker_answer, stronger_answer), run apart from the stream consumer.

The consumer only marks candidates (a liked response with no disliked counterpart, a disliked one with no
liked counterpart) in a sorted set; the ``pairs.generate`` task takes a batch of them, asks an
OpenAI-compatible endpoint for the missing side, and stores the pairs. A candidate leaves the set once it
yields a pair, is no longer eligible, or has failed ``generation_max_attempts`` times.

A round shares its batch among the users who rated the candidates, one each in turn, each user's oldest first.
When candidates arrive faster than rounds take them, the set backs up, and taken strictly by age a round would go
to whoever rated most: one heavy user, or an adversary rating every answer, could hold back everyone else's
generated pairs.

Sources: the weaker answer comes from the served base model without adapter (``feedloop-base`` on the
feedloop API) at a high temperature, or from any OpenAI-compatible URL (``pairs.weaker_source``); the
stronger answer comes from a teacher endpoint (``pairs.teacher_url``), optionally checked by an LLM judge
that must prefer it to the disliked response.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from redis import Redis

from services.core.config import Settings
from services.core.keys import Keys
from services.core.redis_lock import redis_lock
from workers.pairing import quality
from workers.pairing import rules as pairing
from workers.pairing.pii import scrub_pair
from workers.pairing.retention import retention_s
from workers.pairing.rules import PairRecord, RatedResponse
from workers.pairing.store import CommandBatch, PairsStore, parse_label, tally

log = logging.getLogger(__name__)

# A round looks this many batches deep into the candidate set for users to share its batch among.
FAIR_WINDOW_BATCHES = 8


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str
    api_key: str
    temperature: float

    def client(self, timeout: float) -> Any:
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=self.api_key or "unused", timeout=timeout, max_retries=1)


def _v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def weaker_endpoint(settings: Settings) -> Endpoint:
    cfg = settings.pairs
    if cfg.weaker_source == "base":
        api = cfg.api_url or f"http://{settings.api.host}:{settings.api.port}"
        return Endpoint(_v1(api), settings.engine.served_model_name, cfg.weaker_api_key, cfg.weaker_temperature)
    model = cfg.weaker_model or settings.engine.served_model_name
    return Endpoint(_v1(cfg.weaker_source), model, cfg.weaker_api_key, cfg.weaker_temperature)


def teacher_endpoint(settings: Settings) -> Endpoint | None:
    cfg = settings.pairs
    if not cfg.teacher_url or not cfg.teacher_model:
        return None
    return Endpoint(_v1(cfg.teacher_url), cfg.teacher_model, cfg.teacher_api_key, 0.7)


def complete(client: Any, endpoint: Endpoint, messages: list[pairing.Message], max_tokens: int) -> str:
    reply = client.chat.completions.create(
        model=endpoint.model, messages=messages, temperature=endpoint.temperature, max_tokens=max_tokens
    )
    return reply.choices[0].message.content or ""


def judge_prefers(
    client: Any, endpoint: Endpoint, pid: str, prompt: list[pairing.Message], candidate: str, baseline: str
) -> bool:
    """Whether the judge ranks candidate above baseline (positions alternate by pair id)."""
    first = pairing.judge_order(pid)
    a, b = (candidate, baseline) if first else (baseline, candidate)
    reply = client.chat.completions.create(
        model=endpoint.model, messages=pairing.judge_messages(prompt, a, b), temperature=0.0, max_tokens=8
    )
    verdict = pairing.parse_verdict(reply.choices[0].message.content or "")
    return verdict == ("A" if first else "B")


@dataclass
class _Candidate:
    completion_id: str
    record: dict[str, Any]
    rated: RatedResponse
    pid: str


def _eligible(
    redis: Redis, keys: Keys, store: PairsStore, strategy: str, cids: list[str]
) -> tuple[list[_Candidate], list[str]]:
    """Candidates still wanting a generated counterpart, and the ids to drop from the candidate set: a
    candidate must still hold its label, have no counterpart of the opposite label for a same_prompt pair,
    and have no pair (or drop) of this strategy yet."""
    found = store.completions_with_votes(cids)
    want = "like" if strategy == "weaker_answer" else "dislike"
    opposite_of = keys.prompt_disliked if strategy == "weaker_answer" else keys.prompt_liked
    ordered = [c for c in cids if c in found]
    batch = CommandBatch()
    for cid in ordered:
        pid = pairing.pair_id(strategy, cid)
        batch.add("HGET", keys.prompt_group(found[cid][0]["prompt_hash"]), cid)
        batch.add("ZCARD", opposite_of(found[cid][0]["prompt_hash"]))
        batch.add("EXISTS", keys.pair(pid), keys.pair_dropped(pid))
    replies = batch.execute(redis)
    keep: list[_Candidate] = []
    stale = [c for c in cids if c not in found]
    for i, cid in enumerate(ordered):
        label, has_counterpart, already = parse_label(replies[3 * i]), replies[3 * i + 1], replies[3 * i + 2]
        if label != want or has_counterpart or already:
            stale.append(cid)
            continue
        record, votes = found[cid]
        _, fids, users = tally(votes)
        rated = RatedResponse(
            cid, record["response"], record["adapter"], fids, users, record.get("tool_calls"), record.get("content")
        )
        keep.append(_Candidate(cid, record, rated, pairing.pair_id(strategy, cid)))
    return keep, stale


def fair_share(candidates: list[_Candidate], size: int) -> list[_Candidate]:
    """Up to ``size`` candidates, one per user in turn (users in the order of their oldest candidate, each user's
    oldest first); a candidate belongs to the first user who rated it."""
    queues: dict[str, deque[_Candidate]] = {}
    for cand in candidates:
        queues.setdefault(cand.rated.users[0] if cand.rated.users else "", deque()).append(cand)
    picked: list[_Candidate] = []
    while queues and len(picked) < size:
        for user in list(queues):
            picked.append(queues[user].popleft())
            if not queues[user]:
                del queues[user]
            if len(picked) == size:
                break
    return picked


def _build(strategy: str, cand: _Candidate, text: str, source: str, judged: bool) -> PairRecord:
    rec = cand.record
    common = {"created_at": time.time(), "phash": rec["prompt_hash"], "entry_id": rec.get("entry_id", "")}
    if strategy == "weaker_answer":
        return pairing.weaker_answer_pair(
            rec["prompt"], cand.rated, text, source=source, tools=rec.get("tools"), **common
        )
    return pairing.stronger_answer_pair(
        rec["prompt"], cand.rated, text, source=source, judged=judged, tools=rec.get("tools"), **common
    )


def generate_pairs(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    *,
    strategies: list[str] | None = None,
    endpoints: dict[str, Endpoint] | None = None,
    token_counter: quality.TokenCounter | None = None,
) -> dict[str, Any]:
    """One generation round for each enabled generation strategy; returns counts per strategy."""
    cfg = settings.pairs
    store = PairsStore(redis, keys, retention_s(settings))
    store.ensure_scripts()
    tokens = token_counter or quality.TokenCounter.for_settings(settings)
    chosen = [s for s in (strategies or cfg.strategies) if s in pairing.GENERATED_STRATEGIES]
    report: dict[str, Any] = {}
    for strategy in chosen:
        endpoint = (endpoints or {}).get(strategy) or (
            weaker_endpoint(settings) if strategy == "weaker_answer" else teacher_endpoint(settings)
        )
        if endpoint is None:
            report[strategy] = {"skipped": "no endpoint configured"}
            continue
        # Beat starts a round every few seconds while one may still be waiting on a busy engine. A second round would
        # take the same first candidates and fill the worker's other slot, and the stream consumer would wait behind
        # both (one demo's consumer then wrote 172 pairs at once, far past the training trigger).
        with redis_lock(redis, keys.pairing_generation_lock(strategy), _round_bound_ms(settings, strategy)) as held:
            if not held:
                report[strategy] = {"skipped": "another round is running"}
                continue
            report[strategy] = _run_strategy(redis, keys, settings, store, tokens, strategy, endpoint)
    return report


def _round_bound_ms(settings: Settings, strategy: str) -> int:
    """How long a round can take: waves of generation_concurrency requests (and judge calls), each up to its
    timeout twice (one retry); the lock expires then if its worker died."""
    cfg = settings.pairs
    waves = math.ceil(cfg.generation_batch / max(1, cfg.generation_concurrency))
    calls = 2 if strategy == "stronger_answer" and cfg.judge else 1
    return int(1000 * (waves * calls * 2 * cfg.generation_timeout_s + 60))


def _run_strategy(
    redis: Redis,
    keys: Keys,
    settings: Settings,
    store: PairsStore,
    tokens: quality.TokenCounter,
    strategy: str,
    endpoint: Endpoint,
) -> dict[str, int]:
    cfg = settings.pairs
    candidates_key = keys.pairing_candidates(strategy)
    raw: Any = redis.zrange(candidates_key, 0, cfg.generation_batch * FAIR_WINDOW_BATCHES - 1)
    cids = [c.decode() if isinstance(c, bytes) else c for c in raw]
    counts = {"candidates": len(cids), "written": 0, "dropped": 0, "failed": 0, "ineligible": 0, "deferred": 0}
    if not cids:
        return counts
    eligible, stale = _eligible(redis, keys, store, strategy, cids)
    todo = fair_share(eligible, cfg.generation_batch)
    counts["ineligible"], counts["deferred"] = len(stale), len(eligible) - len(todo)
    if stale:
        redis.zrem(candidates_key, *stale)
    client = endpoint.client(cfg.generation_timeout_s)
    judge = None
    if strategy == "stronger_answer" and cfg.judge:
        judge = Endpoint(endpoint.base_url, cfg.judge_model or endpoint.model, endpoint.api_key, 0.0)

    def run(cand: _Candidate) -> tuple[_Candidate, str | None, bool | None, str]:
        try:
            text = complete(client, endpoint, cand.record["prompt"], cfg.generation_max_tokens)
            verdict = None
            if judge is not None:
                verdict = judge_prefers(client, judge, cand.pid, cand.record["prompt"], text, cand.record["response"])
            return cand, text, verdict, ""
        except Exception as exc:  # network and API errors: retried on a later round
            return cand, None, None, repr(exc)

    with ThreadPoolExecutor(max_workers=max(1, cfg.generation_concurrency)) as pool:
        results = list(pool.map(run, todo))

    fits = lambda messages: tokens.fits(messages, cfg.max_tokens)  # noqa: E731
    batch = CommandBatch()
    for cand, text, verdict, error in results:
        attempt_key = f"{strategy}:{cand.completion_id}"
        if text is None:
            log.warning("%s generation failed for %s: %s", strategy, cand.completion_id, error)
            counts["failed"] += 1
            attempts = redis.hincrby(keys.pairing_attempts, attempt_key, 1)
            if attempts >= cfg.generation_max_attempts:
                reason = quality.drop_field("generation", "failed")
                store.queue_drop(batch, cand.pid, reason, {reason: 1})
                batch.add("ZREM", candidates_key, cand.completion_id)
                batch.add("HDEL", keys.pairing_attempts, attempt_key)
            continue
        pair = _build(strategy, cand, text, endpoint.model, judged=verdict is not None)
        pii = scrub_pair(pair)
        drop = quality.check_pair(pair, fits)
        if drop is None and verdict is False:
            drop = ("judge", "not_better")
        if drop is None:
            counters = {
                quality.created_field(strategy): 1,
                **{quality.pii_field(k): n for k, n in pii.items()},
            }
            store.queue_pair(batch, pair, counters)
            counts["written"] += 1
        else:
            reason = quality.drop_field(*drop)
            store.queue_drop(batch, cand.pid, reason, {reason: 1})
            counts["dropped"] += 1
        batch.add("ZREM", candidates_key, cand.completion_id)
        batch.add("HDEL", keys.pairing_attempts, attempt_key)
    errors = [reply for reply in batch.execute(redis) if isinstance(reply, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} generation writes failed: {errors[0]}")
    return counts
