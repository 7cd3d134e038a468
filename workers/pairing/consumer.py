"""Feedback stream consumer: feedback events in, stored pairs out, nothing lost, nothing duplicated.

One module (over 400 lines) because the ack rule spans every stage: an entry is acked only when all the
writes of all the stages below succeeded, and that bookkeeping is easiest to check in one place.

One batch is a handful of round trips whatever its size:
  1. XREADGROUP (or XAUTOCLAIM for entries idle past claim_idle_ms, i.e. a dead consumer's, plus XPENDING
     for their delivery counts);
  2. one pipeline: the vote script, one call per 256 events in stream order (atomic per call, so per
     event; see workers/pairing/store.py), which also stores the rated completions and reports for each
     event the responses to the same prompt rated the other way;
  3. one pipeline reading those responses and their votes (only when a vote found any);
  4. one pipeline of writes: pairs and drop markers (one record script call per 512, each record SET NX
     under its deterministic id and failing alone), generation candidates, dead letters;
  5. XACK of exactly the entries whose writes all succeeded.
Pairs already known to be stored are not built again. consume() runs step 1 and steps 2-3 of the next two
batches in two more threads (each one batch after another, so votes still go in stream order) while steps
4-5 of the current one run; see consume().
A crash anywhere leaves unacked entries pending; another consumer reclaims them and processes them again,
and because the vote script is idempotent per feedback id and pair writes are SET NX, the second pass adds
nothing twice (counters move only when a write is new). An entry that is malformed, or that has failed
max_deliveries times, is copied to the dead-letter stream with its error, then acked.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

from services.core import metrics
from services.core.config import Settings
from services.core.keys import Keys
from services.feedback.events import FeedbackEvent, MalformedEvent, parse_event
from workers.pairing import quality
from workers.pairing import rules as pairing
from workers.pairing import store as pairs_store
from workers.pairing.pii import scrub_pair
from workers.pairing.retention import retention_s
from workers.pairing.rules import PairRecord, RatedResponse
from workers.pairing.store import CommandBatch, PairsStore, RecordBatch, VoteBatch, VoteOutcome, supporters, tally

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


_VOTES_PER_CALL = 256  # events per vote script call: bounds how long one call keeps Redis busy (a few ms)
_RECORDS_PER_CALL = 512
_CACHE_SIZE = 100_000  # completions remembered (prompt hash, record stored), then forgotten at once

# Trim the feedback stream up to what every consumer group has acknowledged (never an unconsumed entry).
# KEYS: stream. Returns {entries trimmed, the MINID used ('' when nothing may be trimmed)}.
# Per group the first entry to keep is its oldest pending (delivered, unacknowledged) entry, or when none is
# pending, the entry after the last one delivered to it. XTRIM MINID removes only entries below the lowest.
_TRIM_ACKNOWLEDGED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, ''} end
local best_ms, best_seq, best = nil, nil, nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local ms, seq
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    ms, seq = string.match(summary[2], '^(%d+)-(%d+)$')
    seq = tonumber(seq)
  else
    ms, seq = string.match(info['last-delivered-id'], '^(%d+)-(%d+)$')
    seq = tonumber(seq) + 1
  end
  local nms = tonumber(ms)
  if best_ms == nil or nms < best_ms or (nms == best_ms and seq < best_seq) then
    best_ms, best_seq, best = nms, seq, ms .. '-' .. string.format('%d', seq)
  end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', best), best}
"""


@dataclass(slots=True)
class _Work:
    entry_id: bytes
    event: FeedbackEvent
    phash: str
    outcome: VoteOutcome | None = None
    pairs: list[PairRecord] = field(default_factory=list)


@dataclass(slots=True)
class _Record:
    pid: str
    owners: list[bytes]  # entries whose votes derived the pair
    label: str  # strategy, or filter:reason of a drop
    pii: Mapping[str, int] | None  # values masked; None for a drop


@dataclass(slots=True)
class _Batch:
    entries: Sequence[Entry]
    deliveries: dict[bytes, int]
    work: list[_Work] = field(default_factory=list)
    dead: list[tuple[bytes, dict[bytes, bytes], str]] = field(default_factory=list)
    votes: list[VoteBatch] = field(default_factory=list)
    epoch: int = 0  # _stored_epoch the vote calls were built under
    failed: dict[bytes, str] = field(default_factory=dict)  # entry -> error; left pending
    others: dict[str, tuple[dict[str, Any], list[bytes]]] = field(default_factory=dict)  # counterparts read


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
        self.store = PairsStore(redis, keys, retention_s(settings))
        self.tokens = token_counter or quality.TokenCounter.for_settings(settings)
        self.strategies = set(self.cfg.strategies)
        self._ready = False
        self._last_reclaim = 0.0
        # messages (JSON) -> prompt hash, and the completions whose records Redis is known to hold (pairing
        # keys are never deleted; a NOSCRIPT reply, i.e. a Redis restart, forgets them)
        self._phashes: dict[bytes, str] = {}
        self._stored: set[str] = set()
        self._stored_epoch = 0
        self._stored_lock = threading.Lock()  # the vote stage adds to _stored; either stage may forget it
        self._known_pairs: set[str] = set()  # pair ids stored or dropped (pairs are never deleted)

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
        args: list[Any] = ["XREADGROUP", "GROUP", self.cfg.consumer_group, self.name, "COUNT", self.cfg.batch_size]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        read = CommandBatch()
        read.add(*args, "STREAMS", self.keys.feedback_stream, ">")
        reply = read.execute(self.redis)[0]  # raw reply: redis-py's per-entry dict building is skipped
        if isinstance(reply, Exception):
            if _group_gone(reply):
                self._lost_group(reply)
                return []
            raise reply
        if not reply:
            return []
        streams = list(reply.values()) if isinstance(reply, dict) else [stream[1] for stream in reply]
        return [(entry_id, _field_map(fields)) for entry_id, fields in streams[0]]

    def reclaim(self) -> tuple[list[Entry], dict[bytes, int]]:
        """Claim entries idle longer than claim_idle_ms (a dead or stuck consumer's), with delivery counts."""
        self._last_reclaim = time.monotonic()
        entries: list[Entry] = []
        start = "0-0"
        while len(entries) < self.cfg.batch_size:
            try:
                reply = self.redis.xautoclaim(
                    self.keys.feedback_stream,
                    self.cfg.consumer_group,
                    self.name,
                    min_idle_time=self.cfg.claim_idle_ms,
                    start_id=start,
                    count=self.cfg.batch_size - len(entries),
                )
            except ResponseError as error:
                if not _group_gone(error):
                    raise
                self._lost_group(error)
                return [], {}
            cursor, claimed = reply[0], reply[1]
            entries.extend(e for e in claimed if e[1] is not None)
            start = cursor.decode() if isinstance(cursor, bytes) else cursor
            if start == "0-0":
                break
        if not entries:
            return [], {}
        return entries, self.delivery_counts([e[0] for e in entries])

    def _lost_group(self, error: Exception) -> None:
        """Redis came back without its data (no AOF, a new pod, a failover): the stream and the group are gone.
        Recreate the group (from the start of whatever the stream holds now) and forget what was stored."""
        group = self.cfg.consumer_group
        log.warning("consumer group %s is gone (%s): Redis lost its data; recreating it", group, error)
        self._ready = False
        self._forget_stored()
        self.ensure_ready()

    def trim_acknowledged(self) -> int:
        """Trim the stream below the oldest entry some consumer group still needs; returns entries removed."""
        trimmed, _ = self.redis.eval(_TRIM_ACKNOWLEDGED, 1, self.keys.feedback_stream)
        if trimmed:
            metrics.FEEDBACK_STREAM_TRIMMED.inc(int(trimmed))
        return int(trimmed)

    def prune_consumers(self, idle_ms: int = 3_600_000) -> int:
        """Forget consumers (dead worker processes) that hold nothing and were idle for idle_ms."""
        removed = 0
        try:
            consumers = self.redis.xinfo_consumers(self.keys.feedback_stream, self.cfg.consumer_group)
        except ResponseError as error:
            if not _group_gone(error):
                raise
            self._lost_group(error)
            return 0
        for info in consumers:
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
        try:
            groups = self.redis.xinfo_groups(self.keys.feedback_stream)
        except ResponseError as error:
            if not _group_gone(error):
                raise
            return 0, None  # no stream (Redis lost its data, or nothing was ever sent)
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            if name == self.cfg.consumer_group:
                lag = group.get("lag")
                return int(group["pending"]), (int(lag) if lag is not None else None)
        return 0, None

    # --- processing ---

    def process(self, entries: Sequence[Entry], deliveries: dict[bytes, int] | None = None) -> BatchReport:
        """Turn one batch of stream entries into stored pairs; ack what is done (or dead-lettered)."""
        with _gc_paused():
            return self._apply(self._vote(self._prepare(entries, deliveries)))

    def _prepare(self, entries: Sequence[Entry], deliveries: dict[bytes, int] | None) -> _Batch:
        """Parse a batch (no Redis)."""
        batch = _Batch(entries, deliveries or {})
        max_deliveries = self.cfg.max_deliveries
        phashes = self._phashes
        if len(phashes) > _CACHE_SIZE:
            phashes.clear()
        prompt_hash, dumps, work = pairing.prompt_hash, orjson.dumps, batch.work
        for entry_id, fields in entries:
            if deliveries:
                delivered = deliveries.get(entry_id, 1)
                if delivered > max_deliveries:
                    batch.dead.append((entry_id, fields, f"delivered {delivered} times (max {max_deliveries})"))
                    continue
            try:
                event = parse_event(fields)
            except MalformedEvent as exc:
                batch.dead.append((entry_id, fields, f"malformed: {exc}"))
                continue
            # prompt hashes remembered by the exact messages (as JSON: no objects for the GC to walk)
            messages = dumps(event.messages) if event.tools is None else dumps([event.messages, event.tools])
            phash = phashes.get(messages)
            if phash is None:
                phash = phashes[messages] = prompt_hash(event.messages, event.tools)
            work.append(_Work(entry_id, event, phash))
        return batch

    def _build_votes(self, batch: _Batch) -> None:
        batch.epoch = self._stored_epoch
        if len(self._stored) > _CACHE_SIZE:
            self._stored.clear()
        batch.votes = self._vote_calls(batch.work, _VOTES_PER_CALL)
        for votes in batch.votes:
            self.store.pack_votes(votes, self._max_counterparts())

    def _vote_calls(self, work: Sequence[_Work], per_call: int) -> list[VoteBatch]:
        calls: list[VoteBatch] = []
        stored = self._stored
        vote_value, text_hash = pairs_store.vote_value, pairing.text_hash
        votes = VoteBatch(self.keys)
        n = 0
        for item in work:
            if n == per_call:
                calls.append(votes)
                votes = VoteBatch(self.keys)
                n = 0
            n += 1
            event = item.event
            cid = event.completion_id
            slot = votes.slots.get((cid, item.phash))
            if slot is None:
                record = b""
                if cid not in stored:
                    completion = {
                        "completion_id": cid,
                        "prompt": event.messages,
                        "response": event.response,
                        "adapter": event.adapter,
                        "prompt_hash": item.phash,
                        "entry_id": item.entry_id.decode(),
                    }
                    if event.tools or event.tool_calls:  # a tool-calling prompt, or an answer that calls tools
                        completion.update(tools=event.tools, tool_calls=event.tool_calls, content=event.content)
                    record = orjson.dumps(completion)
                slot = votes.add_slot(cid, item.phash, record)
            correction_hash = text_hash(event.correction) if event.correction else ""
            votes.event_args += (
                slot,
                event.vote_field,
                vote_value(event.created_at, event.feedback_id, event.rating, correction_hash, event.identity),
            )
        if len(votes):
            calls.append(votes)
        return calls

    def _vote(self, batch: _Batch) -> _Batch:
        """Apply a prepared batch's votes and read the counterparts they found (the vote stage)."""
        if batch.work:
            self._build_votes(batch)
            self._apply_votes(batch, batch.failed)
            needed = sorted({cid for item in batch.work if item.outcome for cid in item.outcome.counterparts})
            batch.others = self.store.completions_with_votes(needed)
        return batch

    def _apply(self, batch: _Batch) -> BatchReport:
        """Pair, write and ack a batch whose votes _vote() applied (the write stage)."""
        entries, deliveries, work, dead, failed = batch.entries, batch.deliveries, batch.work, batch.dead, batch.failed
        report = BatchReport(entries=len(entries))
        if len(self._known_pairs) > _CACHE_SIZE:
            self._known_pairs.clear()
        self._hold_if_restarted(batch)
        self._plan_pairs(work, batch.others, failed)
        if failed:
            raw_by_id = dict(entries)
            for item in work:
                if item.entry_id in failed and deliveries.get(item.entry_id, 1) >= self.cfg.max_deliveries:
                    dead.append((item.entry_id, raw_by_id[item.entry_id], failed[item.entry_id]))

        # writes first; an entry is acked only once every write it produced has succeeded
        writes = CommandBatch()
        owners: list[list[bytes]] = []  # entries behind each write command
        records: list[RecordBatch] = []
        record_meta: list[list[_Record]] = []
        queued: dict[str, _Record] = {}  # pair id -> its record in this batch (another vote may re-derive it)
        candidates: dict[str, tuple[list[Any], list[bytes]]] = {}  # key -> (ZADD arguments, owners)
        fits = self._fits
        for item in work:
            entry_id = item.entry_id
            if entry_id in failed:
                continue
            for pair in item.pairs:
                pid = pair["pair_id"]
                if pid in queued:
                    queued[pid].owners.append(entry_id)
                    continue
                if not records or len(records[-1]) == _RECORDS_PER_CALL:
                    records.append(RecordBatch())
                    record_meta.append([])
                pii = scrub_pair(pair)
                drop = quality.check_pair(pair, fits)
                if drop is None:
                    counters = {quality.created_field(pair["strategy"]): 1}
                    counters.update({quality.pii_field(kind): n for kind, n in pii.items()})
                    self.store.add_pair(records[-1], pair, counters)
                    record = _Record(pid, [entry_id], pair["strategy"], pii)
                else:
                    reason = quality.drop_field(*drop)
                    self.store.add_drop(records[-1], pid, reason, {reason: 1})
                    record = _Record(pid, [entry_id], f"{drop[0]}:{drop[1]}", None)
                record_meta[-1].append(record)
                queued[pid] = record
            key = self._candidate_key(item.outcome)
            if key is not None:
                args, key_owners = candidates.setdefault(key, (["ZADD", key, "NX"], []))
                args += (repr(item.event.created_at), item.event.completion_id)
                key_owners.append(entry_id)
        for record_batch, meta in zip(records, record_meta, strict=True):
            self.store.queue_records(writes, record_batch)
            owners.append([owner for record in meta for owner in record.owners])
        for args, key_owners in candidates.values():
            writes.add(*args)
            owners.append(key_owners)
        for entry_id, fields, error in dead:
            self._queue_dead_letter(writes, entry_id, fields, error, deliveries.get(entry_id, 1))
            owners += [[entry_id], [entry_id]]
        trim_at = None  # the dead-letter cap: the oldest letters go first (their total stays in the stats)
        if dead and self.cfg.dead_letter_maxlen > 0:
            trim_at = len(owners)
            writes.add("XTRIM", self.keys.feedback_dead_letter, "MAXLEN", self.cfg.dead_letter_maxlen)
            owners.append([])  # nothing depends on it: a failed trim fails no entry

        write_failed: set[bytes] = set()
        built: Counter[str] = Counter()
        dropped: Counter[str] = Counter()
        masked: Counter[str] = Counter()
        replies = writes.execute(self.redis)
        if trim_at is not None and isinstance(replies[trim_at], int) and replies[trim_at]:
            metrics.FEEDBACK_DEAD_LETTERS_TRIMMED.inc(replies[trim_at])
        for index, (command_owners, reply) in enumerate(zip(owners, replies, strict=True)):
            if isinstance(reply, Exception):
                write_failed.update(command_owners)
                log.warning("write for entries %s failed: %s", b",".join(command_owners).decode(), reply)
                if isinstance(reply, NoScriptError):  # Redis lost its script cache; these entries come back later
                    self._ready = False
                    self._forget_stored()
                continue
            if index >= len(record_meta):
                continue
            for record, new in zip(record_meta[index], reply, strict=True):
                if new != 1 and new != 0:  # this record's write failed (the call went on with the others)
                    write_failed.update(record.owners)
                    log.warning("pair write for entries %s failed: %s", b",".join(record.owners).decode(), new)
                    continue
                self._known_pairs.add(record.pid)  # stored (or dropped) now, whoever wrote it
                if new == 0:
                    continue
                if record.pii is None:
                    report.pairs_dropped += 1
                    dropped[record.label] += 1
                else:
                    report.pairs_written += 1
                    built[record.label] += 1
                    masked.update(record.pii)
        for label, n in built.items():
            metrics.PAIRS_BUILT.labels(label).inc(n)
        for label, n in dropped.items():
            metrics.PAIRS_DROPPED.labels(label).inc(n)
        for kind, n in masked.items():
            metrics.PII_MASKED.labels(kind).inc(n)

        self._hold_if_restarted(batch)  # again: the other stage may have seen a restart during the writes
        dead_ids = {entry_id for entry_id, _, _ in dead}
        acked = [item.entry_id for item in work if item.entry_id not in failed and item.entry_id not in write_failed]
        acked += [entry_id for entry_id in dead_ids if entry_id not in write_failed]
        report.processed = sum(1 for item in work if item.entry_id not in failed) - len(
            {o for o in write_failed if o not in dead_ids}
        )
        report.dead_lettered = len(dead_ids - write_failed)
        metrics.FEEDBACK_DEAD_LETTERED.inc(report.dead_lettered)
        report.failed = len(entries) - len(acked)
        if acked:
            try:
                self.redis.xack(self.keys.feedback_stream, self.cfg.consumer_group, *acked)
            except ResponseError as error:  # Redis lost the group (and these entries) meanwhile
                if not _group_gone(error):
                    raise
                self._lost_group(error)
        return report

    def _fits(self, messages: Sequence[pairing.Message]) -> bool:
        return self.tokens.fits(messages, self.cfg.max_tokens)

    def _forget_stored(self) -> None:
        """Redis lost its scripts (a restart, perhaps with its data): stop trusting what it stored before."""
        with self._stored_lock:
            self._stored.clear()
            self._known_pairs.clear()
            self._stored_epoch += 1

    def _hold_if_restarted(self, batch: _Batch) -> None:
        """A restart seen (NOSCRIPT, by either stage) since this batch's votes were built may have lost
        them: leave its entries pending, so that a later delivery applies them again."""
        if batch.epoch != self._stored_epoch:
            for item in batch.work:
                batch.failed.setdefault(item.entry_id, "Redis restarted after the vote was applied")

    def _apply_votes(self, batch: _Batch, failed: dict[bytes, str]) -> None:
        if not batch.work:
            return
        if batch.epoch != self._stored_epoch:
            self._build_votes(batch)
        max_counterparts = self._max_counterparts()
        calls = CommandBatch()
        for votes in batch.votes:
            self.store.queue_votes(calls, votes, max_counterparts)
        replies = calls.execute(self.redis)
        if any(isinstance(r, NoScriptError) for r in replies):
            # Redis lost its script cache (restart): load, rebuild (completion records included) and rerun
            self._forget_stored()
            self.store.ensure_scripts()
            self._build_votes(batch)
            calls = CommandBatch()
            for votes in batch.votes:
                self.store.queue_votes(calls, votes, max_counterparts)
            replies = calls.execute(self.redis)
        items = iter(batch.work)
        retry: list[_Work] = []
        stored: list[str] = []
        for votes, reply in zip(batch.votes, replies, strict=True):
            chunk = [next(items) for _ in range(len(votes))]
            if isinstance(reply, Exception):
                retry += chunk
            else:
                self._take_outcomes(votes, chunk, reply, stored)
        if retry:
            # a failed call applied the votes before the failing one and none after: apply them one by one
            # (again; the script is idempotent) so that only the failing entries stay pending
            singles = self._vote_calls(retry, 1)
            calls = CommandBatch()
            for votes in singles:
                self.store.queue_votes(calls, votes, max_counterparts)
            for votes, item, reply in zip(singles, retry, calls.execute(self.redis), strict=True):
                if isinstance(reply, Exception):
                    failed[item.entry_id] = f"vote script: {reply}"
                else:
                    self._take_outcomes(votes, [item], reply, stored)
        with self._stored_lock:
            if batch.epoch == self._stored_epoch:  # else Redis restarted meanwhile: these may be gone again
                self._stored.update(stored)

    def _max_counterparts(self) -> int:
        return self.cfg.same_prompt_max_counterparts if "same_prompt" in self.strategies else 0

    def _take_outcomes(self, votes: VoteBatch, chunk: list[_Work], reply: list[Any], stored: list[str]) -> None:
        parse = VoteOutcome.parse
        for item, outcome in zip(chunk, reply, strict=True):
            item.outcome = parse(outcome)
        stored += (cid for cid, _ in votes.slots)

    def _plan_pairs(
        self, work: list[_Work], others: dict[str, tuple[dict[str, Any], list[bytes]]], failed: dict[bytes, str]
    ) -> None:
        support: dict[tuple[str, str], tuple[list[str], list[str]]] = {}  # same votes all batch: compute once
        for item in work:
            outcome = item.outcome
            if outcome is None or (not outcome.counterparts and not item.event.correction):
                continue  # most votes: nothing to pair with yet
            try:
                item.pairs = self._pairs_for(item, others, support)
            except Exception as exc:  # one bad event must not stop the batch
                log.exception("pairing failed for entry %s", item.entry_id.decode())
                failed[item.entry_id] = f"pairing: {exc!r}"

    def _pairs_for(
        self,
        item: _Work,
        others: dict[str, tuple[dict[str, Any], list[bytes]]],
        support: dict[tuple[str, str], tuple[list[str], list[str]]],
    ) -> list[PairRecord]:
        event, outcome = item.event, item.outcome
        assert outcome is not None
        known, label, own_cid = self._known_pairs, outcome.label, event.completion_id
        fresh = []  # counterparts whose pair with this completion is not known to be stored yet
        if label is not None and "same_prompt" in self.strategies:
            for cid in outcome.counterparts:
                if cid in others and cid != own_cid:
                    chosen, rejected = (own_cid, cid) if label == "like" else (cid, own_cid)
                    if pairing.pair_id("same_prompt", chosen, rejected) not in known:
                        fresh.append(cid)
        if not fresh and not event.correction:
            return []
        _, fids, users = tally(outcome.votes) if outcome.votes else (None, [], [])
        own = RatedResponse(own_cid, event.response, event.adapter, fids, users, event.tool_calls, event.content)
        opposite = "dislike" if label == "like" else "like"
        counterparts = []
        for cid in fresh:
            record, votes = others[cid]
            # the vote script saw cid labelled `opposite` at this vote; a later vote in the same batch may
            # have changed it since (the pair is then excluded at snapshot time, like any superseded pair)
            found = support.get((cid, opposite))
            if found is None:
                found = support[(cid, opposite)] = supporters(votes, opposite)
            fids, users = found
            rated = RatedResponse(
                cid, record["response"], record["adapter"], fids, users, record.get("tool_calls"), record.get("content")
            )
            counterparts.append((rated, record["prompt"]))
        pairs = pairing.pairs_for_vote(
            event,
            label=label,
            own=own,
            counterparts=counterparts,
            strategies=self.strategies,
            phash=item.phash,
            entry_id=item.entry_id.decode(),
        )
        return [pair for pair in pairs if pair["pair_id"] not in known]

    def _candidate_key(self, outcome: VoteOutcome | None) -> str | None:
        if outcome is None or outcome.counterparts:
            return None
        if outcome.label == "like" and "weaker_answer" in self.strategies:
            return self.keys.pairing_candidates("weaker_answer")
        if outcome.label == "dislike" and "stronger_answer" in self.strategies:
            return self.keys.pairing_candidates("stronger_answer")
        return None

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
        if self._reclaim_due():
            entries, deliveries = self.reclaim()
            if entries:
                return self.process(entries, deliveries)
        entries = self.read_new(block_ms)
        return self.process(entries) if entries else BatchReport()

    def consume(self, max_seconds: float, *, until_drained: bool = False) -> BatchReport:
        """Process batches for up to max_seconds. until_drained: also stop once the group has nothing
        undelivered and nothing pending (used by tests and `feedloop pairs` tooling).

        Three stages, each in its own thread and each handling one batch at a time in stream order: a
        reader reads (or reclaims) and parses batch N+2, a voter applies batch N+1's votes and reads their
        counterparts, and this thread pairs, writes and acks batch N. Redis runs one stage's calls while the
        others run Python (the GIL is released while a thread waits on its socket). Votes still go in stream
        order, and pairing batch N+1 sees everything batch N wrote. Read and voted entries are only pending
        until this thread acks them after their writes: a crash leaves them to be reclaimed like any other,
        and on return (or an error) both threads have finished and no batch is half done."""
        deadline = time.monotonic() + max_seconds
        total = BatchReport()
        self.ensure_ready()
        self.prune_consumers()
        # GC stays off while the stages overlap (a per-batch pause would be undone by another stage's end)
        with (
            _gc_paused(),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-read") as reader,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="feedback-votes") as voter,
        ):

            def next_batch(block_ms: int | None) -> Future[_Batch]:
                read = reader.submit(self._read_batch, block_ms)
                return voter.submit(lambda: self._vote(read.result()))

            ahead: deque[Future[_Batch]] = deque()  # batches under way, in stream order
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    break
                self.ensure_ready()
                if not ahead:  # nothing under way: wait for new entries (up to block_ms)
                    ahead.append(next_batch(min(self.cfg.block_ms, max(left_ms, 1))))
                batch = ahead.popleft().result()
                report = BatchReport()
                if batch.entries:
                    while len(ahead) < 2:
                        ahead.append(next_batch(None))  # never blocks
                    report = self._apply(batch)
                total.add(report)
                if report.entries == 0 and until_drained:
                    pending, lag = self.group_backlog()
                    if pending == 0 and not lag:
                        break
            for voted in ahead:  # delivered (and voted) already: finish them now, not after claim_idle_ms
                batch = voted.result()
                if batch.entries:
                    total.add(self._apply(batch))
        if self.cfg.trim_acknowledged:
            self.trim_acknowledged()  # what every group has acknowledged: never an entry still needed
        pending, lag = self.group_backlog()
        metrics.set_feedback_backlog(lag=lag or 0, pending=pending)
        return total

    def _reclaim_due(self) -> bool:
        return time.monotonic() - self._last_reclaim >= min(self.cfg.claim_idle_ms / 2000, 5.0)

    def _read_batch(self, block_ms: int | None) -> _Batch:
        """The read stage: reclaim abandoned entries when due, else read new ones; parse them."""
        if self._reclaim_due():
            entries, deliveries = self.reclaim()
            if entries:
                return self._prepare(entries, deliveries)
        return self._prepare(self.read_new(block_ms), None)


def _group_gone(error: Exception) -> bool:
    """NOGROUP (the group is missing) or "no such key" (the stream is): Redis lost its data."""
    text = str(error)
    return text.startswith("NOGROUP") or "no such key" in text


def _field_map(fields: Any) -> dict[bytes, bytes]:
    """A stream entry's fields from a raw [field, value, ...] reply (or a parsed one)."""
    if isinstance(fields, dict):
        return fields
    flat = iter(fields)
    return dict(zip(flat, flat, strict=True))


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC during a batch: its objects (a few thousand per batch, freed by reference counting at
    its end) would otherwise survive into the old generation and trigger full collections, which cost
    about a fifth of the consumer's CPU."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)
