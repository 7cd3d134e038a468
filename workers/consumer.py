"""Feedback stream consumer: feedback events in, stored pairs out, nothing lost, nothing duplicated.

One batch is a handful of round trips whatever its size:
  1. XREADGROUP (or XAUTOCLAIM for entries idle past claim_idle_ms, i.e. a dead consumer's, plus XPENDING
     for their delivery counts);
  2. one pipeline: the vote script per event (atomic per event, see workers/pairs_store.py), which also
     stores the rated completion and reports the responses to the same prompt rated the other way;
  3. one pipeline reading those responses and their votes (only when a vote found any);
  4. one pipeline of writes: pairs (SET NX under deterministic ids), drop markers, generation candidates,
     dead letters;
  5. XACK of exactly the entries whose writes all succeeded.
A crash anywhere leaves unacked entries pending; another consumer reclaims them and processes them again,
and because the vote script is idempotent per feedback id and pair writes are SET NX, the second pass adds
nothing twice (counters move only when a write is new). An entry that is malformed, or that has failed
max_deliveries times, is copied to the dead-letter stream with its error, then acked.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import ResponseError

from services import metrics
from services.config import Settings
from services.store.keys import Keys
from workers import pairing, quality
from workers.pairing import FeedbackEvent, MalformedEvent, PairRecord, RatedResponse
from workers.pairs_store import CommandBatch, PairsStore, VoteOutcome, supporters, tally

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class BatchReport:
    entries: int = 0
    processed: int = 0
    pairs_written: int = 0
    pairs_dropped: int = 0
    dead_lettered: int = 0
    failed: int = 0  # left pending for a later delivery

    def add(self, other: BatchReport) -> None:
        for name in ("entries", "processed", "pairs_written", "pairs_dropped", "dead_lettered", "failed"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Work:
    entry_id: str
    event: FeedbackEvent
    phash: str
    outcome: VoteOutcome | None = None
    pairs: list[PairRecord] = field(default_factory=list)


class FeedbackConsumer:
    """Reads Keys.feedback_stream through the pairing consumer group and stores the pairs it yields."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        *,
        name: str | None = None,
        token_counter: quality.TokenCounter | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.cfg = settings.pairs
        self.name = name or consumer_name()
        self.store = PairsStore(redis, keys)
        self.tokens = token_counter or quality.TokenCounter(settings.model_path())
        self.strategies = set(self.cfg.strategies)
        self._ready = False
        self._last_reclaim = 0.0

    # --- group and stream plumbing ---

    def ensure_ready(self) -> None:
        if self._ready:
            return
        try:
            self.redis.xgroup_create(self.keys.feedback_stream, self.cfg.consumer_group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.store.ensure_scripts()
        self._ready = True

    def read_new(self, block_ms: int | None) -> list[Entry]:
        reply: Any = self.redis.xreadgroup(
            self.cfg.consumer_group,
            self.name,
            {self.keys.feedback_stream: ">"},
            count=self.cfg.batch_size,
            block=block_ms,
        )
        if not reply:
            return []
        return list(reply[0][1])

    def reclaim(self) -> tuple[list[Entry], dict[bytes, int]]:
        """Claim entries idle longer than claim_idle_ms (a dead or stuck consumer's), with delivery counts."""
        self._last_reclaim = time.monotonic()
        entries: list[Entry] = []
        start = "0-0"
        while len(entries) < self.cfg.batch_size:
            reply = self.redis.xautoclaim(
                self.keys.feedback_stream,
                self.cfg.consumer_group,
                self.name,
                min_idle_time=self.cfg.claim_idle_ms,
                start_id=start,
                count=self.cfg.batch_size - len(entries),
            )
            cursor, claimed = reply[0], reply[1]
            entries.extend(e for e in claimed if e[1] is not None)
            start = cursor.decode() if isinstance(cursor, bytes) else cursor
            if start == "0-0":
                break
        if not entries:
            return [], {}
        return entries, self.delivery_counts([e[0] for e in entries])

    def prune_consumers(self, idle_ms: int = 3_600_000) -> int:
        """Forget consumers (dead worker processes) that hold nothing and were idle for idle_ms."""
        removed = 0
        for info in self.redis.xinfo_consumers(self.keys.feedback_stream, self.cfg.consumer_group):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name != self.name and int(info["pending"]) == 0 and int(info["idle"]) > idle_ms:
                self.redis.xgroup_delconsumer(self.keys.feedback_stream, self.cfg.consumer_group, name)
                removed += 1
        return removed

    def delivery_counts(self, ids: Sequence[bytes]) -> dict[bytes, int]:
        low = min(ids, key=_id_key)
        high = max(ids, key=_id_key)
        rows = self.redis.xpending_range(
            self.keys.feedback_stream,
            self.cfg.consumer_group,
            min=low,
            max=high,
            count=max(10 * len(ids), 1000),
            consumername=self.name,
        )
        counts = {row["message_id"]: int(row["times_delivered"]) for row in rows}
        return {i: counts.get(i, 1) for i in ids}

    def group_backlog(self) -> tuple[int, int | None]:
        """(pending entries of the whole group, entries not yet delivered to the group)."""
        for group in self.redis.xinfo_groups(self.keys.feedback_stream):
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.cfg.consumer_group:
                lag = group.get("lag")
                return int(group["pending"]), (int(lag) if lag is not None else None)
        return 0, None

    # --- processing ---

    def process(self, entries: Sequence[Entry], deliveries: dict[bytes, int] | None = None) -> BatchReport:
        """Turn one batch of stream entries into stored pairs; ack what is done (or dead-lettered)."""
        report = BatchReport(entries=len(entries))
        deliveries = deliveries or {}
        dead: list[tuple[bytes, dict[bytes, bytes], str]] = []
        work: list[_Work] = []
        for entry_id, fields in entries:
            delivered = deliveries.get(entry_id, 1)
            if delivered > self.cfg.max_deliveries:
                dead.append((entry_id, fields, f"delivered {delivered} times (max {self.cfg.max_deliveries})"))
                continue
            try:
                event = pairing.parse_event(fields)
            except MalformedEvent as exc:
                dead.append((entry_id, fields, f"malformed: {exc}"))
                continue
            work.append(_Work(entry_id.decode(), event, pairing.prompt_hash(event.messages)))

        failed: dict[str, str] = {}
        self._apply_votes(work, failed)
        self._plan_pairs(work, failed)
        raw_by_id = dict(entries)
        for item in work:
            if item.entry_id in failed:
                entry_id = item.entry_id.encode()
                if deliveries.get(entry_id, 1) >= self.cfg.max_deliveries:
                    dead.append((entry_id, raw_by_id[entry_id], failed[item.entry_id]))

        # writes first; an entry is acked only once every write it produced has succeeded
        writes = CommandBatch()
        owners: list[bytes] = []  # entry id behind each write
        kinds: list[str] = []  # "pair", "drop" or "other"
        seen: list[tuple[str, Mapping[str, int]]] = []  # metric label (strategy or drop reason) and PII counts
        for item in work:
            if item.entry_id in failed:
                continue
            entry_id = item.entry_id.encode()
            for pair in item.pairs:
                pii = quality.scrub_pair(pair)
                drop = quality.check_pair(pair, self._fits)
                if drop is None:
                    counters = {quality.created_field(pair["strategy"]): 1}
                    counters.update({quality.pii_field(kind): n for kind, n in pii.items()})
                    self.store.queue_pair(writes, pair, counters)
                    kinds.append("pair")
                    seen.append((pair["strategy"], pii))
                else:
                    reason = quality.drop_field(*drop)
                    self.store.queue_drop(writes, pair["pair_id"], reason, {reason: 1})
                    kinds.append("drop")
                    seen.append((f"{drop[0]}:{drop[1]}", {}))
                owners.append(entry_id)
            for key in self._candidate_keys(item):
                writes.add("ZADD", key, "NX", repr(item.event.created_at), item.event.completion_id)
                owners.append(entry_id)
                kinds.append("other")
                seen.append(("", {}))
        for entry_id, fields, error in dead:
            self._queue_dead_letter(writes, entry_id, fields, error, deliveries.get(entry_id, 1))
            owners += [entry_id, entry_id]
            kinds += ["other", "other"]
            seen += [("", {}), ("", {})]

        write_failed: set[bytes] = set()
        replies = writes.execute(self.redis)
        for owner, kind, (label, pii_counts), reply in zip(owners, kinds, seen, replies, strict=True):
            if isinstance(reply, Exception):
                write_failed.add(owner)
                log.warning("write for entry %s failed: %s", owner.decode(), reply)
                if "NOSCRIPT" in str(reply):  # Redis lost its script cache; these entries come back later
                    self._ready = False
            elif reply == 1 and kind == "pair":
                report.pairs_written += 1
                metrics.PAIRS_BUILT.labels(label).inc()
                for pii_kind, n in pii_counts.items():
                    metrics.PII_MASKED.labels(pii_kind).inc(n)
            elif reply == 1 and kind == "drop":
                report.pairs_dropped += 1
                metrics.PAIRS_DROPPED.labels(label).inc()

        dead_ids = {entry_id for entry_id, _, _ in dead}
        acked = [
            item.entry_id.encode()
            for item in work
            if item.entry_id not in failed and item.entry_id.encode() not in write_failed
        ]
        acked += [entry_id for entry_id in dead_ids if entry_id not in write_failed]
        report.processed = sum(1 for item in work if item.entry_id not in failed) - len(
            {o for o in write_failed if o not in dead_ids}
        )
        report.dead_lettered = len(dead_ids - write_failed)
        metrics.FEEDBACK_DEAD_LETTERED.inc(report.dead_lettered)
        report.failed = len(entries) - len(acked)
        if acked:
            self.redis.xack(self.keys.feedback_stream, self.cfg.consumer_group, *acked)
        return report

    def _fits(self, messages: Sequence[pairing.Message]) -> bool:
        return self.tokens.fits(messages, self.cfg.max_tokens)

    def _apply_votes(self, work: list[_Work], failed: dict[str, str]) -> None:
        if not work:
            return
        batch = CommandBatch()
        for item in work:
            event = item.event
            record = {
                "completion_id": event.completion_id,
                "prompt": event.messages,
                "response": event.response,
                "adapter": event.adapter,
                "prompt_hash": item.phash,
                "entry_id": item.entry_id,
            }
            self.store.queue_vote(
                batch,
                completion_id=event.completion_id,
                phash=item.phash,
                identity=event.identity,
                rating=event.rating,
                created_at=event.created_at,
                feedback_id=event.feedback_id,
                correction_hash=pairing.text_hash(event.correction) if event.correction else "",
                completion_json=orjson.dumps(record),
                max_counterparts=self.cfg.same_prompt_max_counterparts if "same_prompt" in self.strategies else 0,
            )
        replies = batch.execute(self.redis)
        if any(isinstance(r, Exception) and "NOSCRIPT" in str(r) for r in replies):
            self.store.ensure_scripts()  # Redis lost its script cache (restart): load and run once more
            replies = batch.execute(self.redis)
        for item, reply in zip(work, replies, strict=True):
            if isinstance(reply, Exception):
                failed[item.entry_id] = f"vote script: {reply}"
            else:
                item.outcome = VoteOutcome.parse(reply)

    def _plan_pairs(self, work: list[_Work], failed: dict[str, str]) -> None:
        needed = sorted({cid for item in work if item.outcome for cid in item.outcome.counterparts})
        others = self.store.completions_with_votes(needed)
        for item in work:
            if item.outcome is None:
                continue
            try:
                item.pairs = self._pairs_for(item, others)
            except Exception as exc:  # one bad event must not stop the batch
                log.exception("pairing failed for entry %s", item.entry_id)
                failed[item.entry_id] = f"pairing: {exc!r}"

    def _pairs_for(self, item: _Work, others: dict[str, tuple[dict[str, Any], list[bytes]]]) -> list[PairRecord]:
        event, outcome = item.event, item.outcome
        assert outcome is not None
        if not outcome.counterparts and not event.correction:
            return []  # most votes: nothing to pair with yet
        _, fids, users = tally(outcome.votes) if outcome.votes else (None, [], [])
        own = RatedResponse(event.completion_id, event.response, event.adapter, fids, users)
        opposite = {"like": "dislike", "dislike": "like"}.get(outcome.label or "")
        counterparts = []
        for cid in outcome.counterparts:
            if cid not in others:
                continue
            record, votes = others[cid]
            # the vote script saw cid labelled `opposite` at this vote; a later vote in the same batch may
            # have changed it since (the pair is then excluded at snapshot time, like any superseded pair)
            fids, users = supporters(votes, opposite)
            rated = RatedResponse(cid, record["response"], record["adapter"], fids, users)
            counterparts.append((rated, record["prompt"]))
        return pairing.pairs_for_vote(
            event,
            label=outcome.label,
            own=own,
            counterparts=counterparts,
            strategies=self.strategies,
            phash=item.phash,
            entry_id=item.entry_id,
        )

    def _candidate_keys(self, item: _Work) -> list[str]:
        outcome = item.outcome
        if outcome is None or outcome.counterparts:
            return []
        if outcome.label == "like" and "weaker_answer" in self.strategies:
            return [self.keys.pairing_candidates("weaker_answer")]
        if outcome.label == "dislike" and "stronger_answer" in self.strategies:
            return [self.keys.pairing_candidates("stronger_answer")]
        return []

    def _queue_dead_letter(
        self, batch: CommandBatch, entry_id: bytes, fields: dict[bytes, bytes], error: str, deliveries: int
    ) -> None:
        raw = fields.get(b"event")
        letter: dict[str, Any] = {
            "entry_id": entry_id,
            "error": error[:2000],
            "deliveries": deliveries,
            "consumer": self.name,
            "dead_at": repr(time.time()),
        }
        letter["event"] = (
            raw
            if raw is not None
            else orjson.dumps({k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()})
        )
        flat = [part for name, value in letter.items() for part in (name, value)]
        batch.add("XADD", self.keys.feedback_dead_letter, "*", *flat)
        batch.add("HINCRBY", self.keys.pairs_stats, "dead_letter", 1)

    # --- loops ---

    def run_once(self, block_ms: int | None = None) -> BatchReport:
        """Reclaim abandoned entries when due, else read new ones; process one batch."""
        self.ensure_ready()
        due = time.monotonic() - self._last_reclaim >= min(self.cfg.claim_idle_ms / 2000, 5.0)
        if due:
            entries, deliveries = self.reclaim()
            if entries:
                return self.process(entries, deliveries)
        entries = self.read_new(block_ms)
        return self.process(entries) if entries else BatchReport()

    def consume(self, max_seconds: float, *, until_drained: bool = False) -> BatchReport:
        """Process batches for up to max_seconds. until_drained: also stop once the group has nothing
        undelivered and nothing pending (used by tests and `feedloop pairs` tooling)."""
        deadline = time.monotonic() + max_seconds
        total = BatchReport()
        self.ensure_ready()
        self.prune_consumers()
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            batch = self.run_once(block_ms=min(self.cfg.block_ms, max(left_ms, 1)))
            total.add(batch)
            if batch.entries == 0 and until_drained:
                pending, lag = self.group_backlog()
                if pending == 0 and not lag:
                    break
        pending, lag = self.group_backlog()
        metrics.set_feedback_backlog(lag=lag or 0, pending=pending)
        return total


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
