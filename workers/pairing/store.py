"""Redis side of pairing: the atomic vote script, idempotent pair writes, and reading pairs back.

Over 400 lines because most of it is the Lua that mirrors workers/pairing/rules.py; the two are read
side by side.

Why Lua: a vote changes several keys of one prompt group (the identity's vote, the completion's majority
label, the liked/disliked sets) and must read the result back. Doing it in one script makes each vote
atomic, so any number of consumers can process events at once without racing on a prompt group. One call
applies a few hundred votes: the fixed cost of an EVALSHA and of each redis.call from Lua is most of a
vote's Redis CPU, so a call reads each completion's votes once and keeps them for its later events.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from hiredis import pack_command as _pack_command
from redis import Redis
from redis.exceptions import ResponseError

from services.core.keys import Keys
from workers.pairing.rules import PairRecord

# A batch of votes in one script call: atomic per batch (so per event), and one EVALSHA instead of one per
# event (the per-call overhead of EVALSHA and of each redis.call is most of the vote's Redis CPU).
# KEYS: 1 labeled_completions, then 5 per slot (one slot per distinct completion and prompt hash in the
#       batch): votes(cid) prompt_group(ph) prompt_liked(ph) prompt_disliked(ph) pairing_completion(cid)
# ARGV: 1 most counterparts returned 2 number of slots, then 2 per slot: cid, completion JSON ('' when the
#       caller knows it is stored), then 3 per event in stream order: slot (1-based), vote field, vote
# A vote is stored as "created_at|feedback_id|rating|correction_hash|voter" under its vote field: the voter's
# identity, or the one field of a completion made without a user (FeedbackEvent.vote_field), so a later
# vote from another address replaces the earlier one there as it does in the API. Only the voter may hold
# "|" (it is last). Values written before the voter was added have four parts: their field is the voter.
# The group hash maps completion id -> its majority label; it only ever
# changes here, together with the votes, so the label before a vote is the majority of the votes read.
# Returns per event either its label (when it has no counterparts) or {label, counterparts, votes}: the
# completion's label after the vote, the newest responses to the same prompt currently labelled the other
# way, and the completion's votes as a flat HGETALL list. The reply does not depend on whether the vote was
# new, so a redelivered event re-derives the same pairs.
VOTE_BATCH_SCRIPT = """
local k = tonumber(ARGV[1]) - 1
local nslots = tonumber(ARGV[2])
for s = 1, nslots do
  if ARGV[2 + 2 * s] ~= '' then redis.call('SET', KEYS[1 + 5 * s], ARGV[2 + 2 * s], 'NX') end
end
local function rating(vote)  -- +1 like, -1 dislike, 0 other
  local r = string.match(vote, '^[^|]*|[^|]*|([^|]*)')
  if r == 'like' then return 1 elseif r == 'dislike' then return -1 end
  return 0
end
local function majority(state)
  if state.nl > state.nd then return 'like' elseif state.nd > state.nl then return 'dislike' end
  return ''
end
local slots = {}  -- slot -> {votes = flat HGETALL list, nl = likes, nd = dislikes}, read once per call
local out = {}
for a = 3 + 2 * nslots, #ARGV, 3 do
  local s, who, vote = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2]
  local base = 5 * s - 4
  local vk, lk, dk, cid = KEYS[base + 1], KEYS[base + 3], KEYS[base + 4], ARGV[1 + 2 * s]
  local state = slots[s]
  if state == nil then
    state = {votes = redis.call('HGETALL', vk), nl = 0, nd = 0}
    for i = 2, #state.votes, 2 do
      local r = rating(state.votes[i])
      if r == 1 then state.nl = state.nl + 1 elseif r == -1 then state.nd = state.nd + 1 end
    end
    slots[s] = state
  end
  local votes = state.votes
  local at = nil
  for i = 1, #votes, 2 do
    if votes[i] == who then at = i break end
  end
  local old = majority(state)
  local label = old
  local ts, fid = string.match(vote, '^([^|]*)|([^|]*)|')
  local nts = tonumber(ts)
  local fresh = true
  if at then
    local cts, cfid = string.match(votes[at + 1], '^([^|]*)|([^|]*)|')
    cts = tonumber(cts)
    if cts > nts or (cts == nts and cfid >= fid) then fresh = false end
  end
  if fresh then
    redis.call('HSET', vk, who, vote)
    if at then
      local r = rating(votes[at + 1])
      if r == 1 then state.nl = state.nl - 1 elseif r == -1 then state.nd = state.nd - 1 end
      votes[at + 1] = vote
    else
      votes[#votes + 1] = who
      votes[#votes + 1] = vote
    end
    local r = rating(vote)
    if r == 1 then state.nl = state.nl + 1 elseif r == -1 then state.nd = state.nd + 1 end
    label = majority(state)
    if label ~= old then
      redis.call('HSET', KEYS[base + 2], cid, label)
      if old == 'like' then redis.call('ZREM', lk, cid)
      elseif old == 'dislike' then redis.call('ZREM', dk, cid) end
    end
    if label == 'like' then redis.call('ZADD', lk, ts, cid)
    elseif label == 'dislike' then redis.call('ZADD', dk, ts, cid) end
    if label ~= '' and old == '' then redis.call('ZADD', KEYS[1], 'NX', ts, cid) end
  end
  local others = nil
  if k >= 0 then
    if label == 'like' then others = redis.call('ZREVRANGE', dk, 0, k)
    elseif label == 'dislike' then others = redis.call('ZREVRANGE', lk, 0, k) end
  end
  if others and #others > 0 then
    local copy = {}  -- the votes as of this event (later events of the call change the cached list)
    for i = 1, #votes do copy[i] = votes[i] end
    out[#out + 1] = {label, others, copy}
  else
    out[#out + 1] = label
  end
end
return out
"""

# RECORD_PAIR_SCRIPT for many records in one call. Each record is done (stored, indexed, counted) before
# the next, and a failing record does not stop the others: it is answered with its error message.
# KEYS: 1 pairs_index 2 pairs_seq 3 pairs_stats, then one per record: the pair (or dropped-marker) key
# ARGV: per record: pair id, value, mode, n, then n field/increment pairs. mode: '1' index the pair, '0' a marker
# kept forever, 'ex:<seconds>' a marker that expires (drop markers only guard redeliveries: pairs.retention_s)
# Returns per record 1 (new, counted), 0 (already stored) or "ERR <message>".
RECORD_BATCH_SCRIPT = """
local function record(key, pid, value, index, a, n)
  local set = redis.pcall('SET', key, value, 'NX')
  if type(set) == 'table' and set.err then return set.err end
  if not set then return 0 end
  if index == '1' then
    local seq = redis.pcall('INCR', KEYS[2])
    if type(seq) == 'table' and seq.err then return seq.err end
    local added = redis.pcall('ZADD', KEYS[1], seq, pid)
    if type(added) == 'table' and added.err then return added.err end
  elseif string.sub(index, 1, 3) == 'ex:' then
    redis.pcall('EXPIRE', key, tonumber(string.sub(index, 4)))
  end
  for i = a + 4, a + 2 + 2 * n, 2 do
    local done = redis.pcall('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
    if type(done) == 'table' and done.err then return done.err end
  end
  return 1
end
local out = {}
local a, r = 1, 4
while a <= #ARGV do
  local n = tonumber(ARGV[a + 3])
  local result = record(KEYS[r], ARGV[a], ARGV[a + 1], ARGV[a + 2], a, n)
  if type(result) == 'string' then result = 'ERR ' .. result end
  out[#out + 1] = result
  a = a + 4 + 2 * n
  r = r + 1
end
return out
"""

# KEYS: 1 pair (or dropped-marker) key 2 pairs_index 3 pairs_seq 4 pairs_stats
# ARGV: 1 pair id 2 value 3 mode (as in RECORD_BATCH_SCRIPT) 4.. field, increment, field, increment ...
# Counters move only when the key is new, so a redelivered event never counts twice.
RECORD_PAIR_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then
  if ARGV[3] == '1' then
    local seq = redis.call('INCR', KEYS[3])
    redis.call('ZADD', KEYS[2], seq, ARGV[1])
  elseif string.sub(ARGV[3], 1, 3) == 'ex:' then
    redis.call('EXPIRE', KEYS[1], tonumber(string.sub(ARGV[3], 4)))
  end
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  return 1
end
return 0
"""


class CommandBatch:
    """Commands sent to Redis in one write and answered in order: a pipeline without redis-py's
    per-command encoding and reply callbacks (hiredis packs in about a third of the time). Error replies
    come back as ResponseError instances in place, never raised."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []
        self.packed: dict[int, bytes] = {}  # command index -> its pack_command() bytes, packed beforehand

    def add(self, *args: Any) -> None:
        self.commands.append(args)

    def add_packed(self, args: tuple[Any, ...], packed: bytes | None) -> None:
        if packed is not None:
            self.packed[len(self.commands)] = packed
        self.commands.append(args)

    def __len__(self) -> int:
        return len(self.commands)

    def execute(self, redis: Redis) -> list[Any]:
        if not self.commands:
            return []
        pool = redis.connection_pool
        conn = pool.get_connection()
        try:
            packed = self.packed
            conn.send_packed_command(
                [b"".join(packed.get(i) or _pack_command(args) for i, args in enumerate(self.commands))]
            )
            replies: list[Any] = []
            for _ in self.commands:
                try:
                    replies.append(conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            conn.disconnect()  # replies may be half read: never hand this connection out again as is
            raise
        finally:
            pool.release(conn)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _flat(reply: Any) -> list[Any]:
    """A hash reply as a flat [field, value, ...] list (RESP3 connections return a map)."""
    if isinstance(reply, dict):
        return [part for item in reply.items() for part in item]
    return list(reply)


@dataclass(frozen=True, slots=True)
class StoredVote:
    created_at: float
    feedback_id: str
    rating: str
    correction_hash: str
    voter: str


def parse_vote(field: bytes | str, raw: bytes | str) -> StoredVote:
    """A stored vote (see VOTE_BATCH_SCRIPT) from its hash field and value."""
    parts = _text(raw).split("|", 4)
    voter = parts[4] if len(parts) == 5 else _text(field)
    return StoredVote(float(parts[0]), parts[1], parts[2], parts[3], voter)


def parse_votes(votes: Sequence[bytes | str]) -> Iterator[StoredVote]:
    """The votes of a completion's votes hash (a flat HGETALL list)."""
    for i in range(0, len(votes), 2):
        yield parse_vote(votes[i], votes[i + 1])


def tally(votes: Sequence[bytes | str], limit: int = 20) -> tuple[str | None, list[str], list[str]]:
    """From a completion's votes (flat HGETALL list): its majority label and the feedback ids and
    identities of the votes behind that label, oldest first (at most limit)."""
    counts = Counter(vote.rating for vote in parse_votes(votes))
    if counts["like"] > counts["dislike"]:
        label = "like"
    elif counts["dislike"] > counts["like"]:
        label = "dislike"
    else:
        return None, [], []
    fids, voters = supporters(votes, label, limit)
    return label, fids, voters


def ratings(votes: Sequence[bytes | str]) -> Iterator[tuple[str, str]]:
    """(identity, rating) of each like and dislike in a completion's votes (flat HGETALL list); a withdrawn vote
    stays in the hash (its timestamp orders later votes) but rates nothing."""
    for vote in parse_votes(votes):
        if vote.rating in ("like", "dislike"):
            yield vote.voter, vote.rating


def supporters(votes: Sequence[bytes | str], rating: str | None, limit: int = 20) -> tuple[list[str], list[str]]:
    """(feedback ids, identities) of the votes with this rating, oldest first (at most limit)."""
    rows = sorted((v.created_at, v.feedback_id, v.voter) for v in parse_votes(votes) if v.rating == rating)
    return [fid for _, fid, _ in rows[:limit]], [who for _, _, who in rows[:limit]]


def parse_label(raw: bytes | str | None) -> str | None:
    return _text(raw) or None if raw else None


@dataclass(slots=True)
class VoteOutcome:
    label: str | None
    counterparts: list[str]  # completion ids labelled the other way, newest first
    votes: list[bytes]  # this completion's votes (flat HGETALL), only when there are counterparts

    @classmethod
    def parse(cls, reply: Any) -> VoteOutcome:
        """One event's part of a VOTE_BATCH_SCRIPT reply: a bare label, or {label, counterparts, votes}."""
        if isinstance(reply, bytes | str):
            return cls(parse_label(reply), [], [])
        return cls(parse_label(reply[0]), [_text(c) for c in reply[1]], list(reply[2]))


class VoteBatch:
    """The arguments of one VOTE_BATCH_SCRIPT call: events in stream order, each naming its slot (a distinct
    completion id and prompt hash) so that keys and the completion record are sent once per slot."""

    __slots__ = ("_k", "command", "event_args", "keys", "max_counterparts", "packed", "slot_args", "slots")

    def __init__(self, keys: Keys) -> None:
        self._k = keys
        self.keys: list[str] = [keys.labeled_completions]
        self.slot_args: list[str | bytes] = []
        self.event_args: list[Any] = []
        self.slots: dict[tuple[str, str], int] = {}
        self.command: tuple[Any, ...] | None = None  # set by PairsStore.pack_votes()
        self.max_counterparts = 0
        self.packed: bytes | None = None

    def __len__(self) -> int:
        return len(self.event_args) // 3

    def add_slot(self, completion_id: str, phash: str, completion_json: bytes) -> int:
        """A new slot; completion_json is b"" when the completion record is known to be stored."""
        k = self._k
        self.keys += (
            k.pairing_votes(completion_id),
            k.prompt_group(phash),
            k.prompt_liked(phash),
            k.prompt_disliked(phash),
            k.pairing_completion(completion_id),
        )
        self.slot_args += (completion_id, completion_json)
        slot = self.slots[(completion_id, phash)] = len(self.slots) + 1
        return slot

    def add(self, slot: int, field: str, vote: str) -> None:
        """One vote, vote_value() formatted, kept under field (FeedbackEvent.vote_field)."""
        self.event_args += (slot, field, vote)


def vote_value(created_at: float, feedback_id: str, rating: str, correction_hash: str, voter: str) -> str:
    return f"{created_at!r}|{feedback_id}|{rating}|{correction_hash}|{voter}"


class RecordBatch:
    """The arguments of one RECORD_BATCH_SCRIPT call."""

    __slots__ = ("args", "keys")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.args: list[Any] = []

    def __len__(self) -> int:
        return len(self.keys)


class PairsStore:
    """Pair storage on one Redis client and key prefix."""

    def __init__(self, redis: Redis, keys: Keys, drop_marker_ttl_s: int = 0) -> None:
        self.redis = redis
        self.keys = keys
        # a drop marker only keeps a redelivered event from counting its drop twice: it expires with the
        # pairing state it came from (pairs.retention_s; 0 keeps it)
        self.drop_mode = f"ex:{drop_marker_ttl_s}" if drop_marker_ttl_s > 0 else "0"
        self.vote_script = redis.register_script(VOTE_BATCH_SCRIPT)
        self.record_script = redis.register_script(RECORD_PAIR_SCRIPT)
        self.record_batch_script = redis.register_script(RECORD_BATCH_SCRIPT)

    def ensure_scripts(self) -> None:
        """Load the scripts so pipelined EVALSHA calls never hit NOSCRIPT."""
        for script in (VOTE_BATCH_SCRIPT, RECORD_PAIR_SCRIPT, RECORD_BATCH_SCRIPT):
            self.redis.script_load(script)

    # --- writes (queued on a CommandBatch) ---

    def pack_votes(self, votes: VoteBatch, max_counterparts: int) -> None:
        """Build (and, with hiredis, encode) the VOTE_BATCH_SCRIPT call, e.g. ahead of time in another thread."""
        votes.max_counterparts = max_counterparts
        votes.command = (
            "EVALSHA",
            self.vote_script.sha,
            len(votes.keys),
            *votes.keys,
            max_counterparts,
            len(votes.slots),
            *votes.slot_args,
            *votes.event_args,
        )
        votes.packed = _pack_command(votes.command)

    def queue_votes(self, batch: CommandBatch, votes: VoteBatch, max_counterparts: int) -> None:
        """One VOTE_BATCH_SCRIPT call; its reply is one VoteOutcome.parse()-able item per event."""
        if votes.command is None or votes.max_counterparts != max_counterparts:
            self.pack_votes(votes, max_counterparts)
        assert votes.command is not None
        batch.add_packed(votes.command, votes.packed)

    def add_pair(self, records: RecordBatch, pair: PairRecord, counters: Mapping[str, int]) -> None:
        """Like queue_pair, on a RecordBatch."""
        pid = pair["pair_id"]
        records.keys.append(self.keys.pair(pid))
        records.args += (pid, orjson.dumps(pair), "1", len(counters))
        for name, value in counters.items():
            records.args += (name, value)

    def add_drop(self, records: RecordBatch, pid: str, reason_field: str, counters: Mapping[str, int]) -> None:
        """Like queue_drop, on a RecordBatch."""
        records.keys.append(self.keys.pair_dropped(pid))
        records.args += (pid, reason_field, self.drop_mode, len(counters))
        for name, value in counters.items():
            records.args += (name, value)

    def queue_records(self, batch: CommandBatch, records: RecordBatch) -> None:
        """One RECORD_BATCH_SCRIPT call; its reply is 1 (new), 0 (known) or b"ERR ..." per record, in order."""
        k = self.keys
        batch.add(
            "EVALSHA",
            self.record_batch_script.sha,
            3 + len(records.keys),
            k.pairs_index,
            k.pairs_seq,
            k.pairs_stats,
            *records.keys,
            *records.args,
        )

    def queue_pair(self, batch: CommandBatch, pair: PairRecord, counters: Mapping[str, int]) -> None:
        """SET NX the pair, index it under the next sequence number and bump counters, all only if new."""
        k = self.keys
        args: list[Any] = [pair["pair_id"], orjson.dumps(pair), "1"]
        for name, value in counters.items():
            args += [name, value]
        batch.add(
            "EVALSHA",
            self.record_script.sha,
            4,
            k.pair(pair["pair_id"]),
            k.pairs_index,
            k.pairs_seq,
            k.pairs_stats,
            *args,
        )

    def queue_drop(self, batch: CommandBatch, pid: str, reason_field: str, counters: Mapping[str, int]) -> None:
        """Remember that a filter dropped this pair id (once), counting the drop only the first time."""
        k = self.keys
        args: list[Any] = [pid, reason_field, self.drop_mode]
        for name, value in counters.items():
            args += [name, value]
        batch.add(
            "EVALSHA",
            self.record_script.sha,
            4,
            k.pair_dropped(pid),
            k.pairs_index,
            k.pairs_seq,
            k.pairs_stats,
            *args,
        )

    # --- reads ---

    def completions(self, completion_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        if not completion_ids:
            return {}
        raws = self.redis.mget([self.keys.pairing_completion(c) for c in completion_ids])
        return {cid: orjson.loads(raw) for cid, raw in zip(completion_ids, raws, strict=True) if raw}

    def completions_with_votes(self, completion_ids: Sequence[str]) -> dict[str, tuple[dict[str, Any], list[bytes]]]:
        """Records and votes (flat HGETALL lists) of completions, in one round trip."""
        if not completion_ids:
            return {}
        batch = CommandBatch()
        batch.add("MGET", *[self.keys.pairing_completion(c) for c in completion_ids])
        for cid in completion_ids:
            batch.add("HGETALL", self.keys.pairing_votes(cid))
        replies = batch.execute(self.redis)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return {
            cid: (orjson.loads(raw), _flat(votes))
            for cid, raw, votes in zip(completion_ids, replies[0], replies[1:], strict=True)
            if raw
        }

    def max_seq(self) -> int:
        return int(self.redis.get(self.keys.pairs_seq) or 0)

    def newest_seq_from(self, max_seq: int, newest: int) -> float:
        """The lowest sequence among the newest `newest` pairs up to max_seq (-inf when newest is 0 or
        there are no more pairs than that)."""
        if newest <= 0:
            return float("-inf")
        rows: Any = self.redis.zrevrangebyscore(
            self.keys.pairs_index, max_seq, "-inf", start=newest - 1, num=1, withscores=True
        )
        return float(rows[0][1]) if rows else float("-inf")

    def iter_pairs(
        self, min_seq: float = float("-inf"), max_seq: float = float("inf"), chunk: int = 2000
    ) -> Iterator[tuple[int, PairRecord]]:
        """(sequence, pair) in creation order, read in chunks."""
        low: float | str = min_seq
        while True:
            rows: Any = self.redis.zrangebyscore(
                self.keys.pairs_index, low, max_seq, start=0, num=chunk, withscores=True
            )
            if not rows:
                return
            ids = [r[0].decode() if isinstance(r[0], bytes) else r[0] for r in rows]
            raws = self.redis.mget([self.keys.pair(i) for i in ids])
            for (_, score), raw in zip(rows, raws, strict=True):
                if raw:
                    yield int(score), orjson.loads(raw)
            if len(rows) < chunk:
                return
            low = f"({int(rows[-1][1])}"

    def count_since(self, seq: int) -> int:
        return int(self.redis.zcount(self.keys.pairs_index, f"({seq}", "+inf"))

    def live_state(self, pairs: Iterable[PairRecord]) -> tuple[dict[str, str | None], dict[tuple[str, str], str]]:
        """Current labels of the completions the pairs name, and the correction hash of each corrected
        vote, as pairing.pair_is_live needs them."""
        label_keys: dict[str, str] = {}
        correction_keys: set[tuple[str, str]] = set()
        for pair in pairs:
            if pair["strategy"] == "correction":
                correction_keys.add((pair["completion_ids"][0], pair["users"][0]))
            else:
                for cid in pair["completion_ids"]:
                    label_keys[cid] = pair["prompt_hash"]
        label_items = list(label_keys.items())
        correction_items = sorted(correction_keys)
        labels: dict[str, str | None] = {}
        corrections: dict[tuple[str, str], str] = {}
        for start in range(0, max(len(label_items), len(correction_items)), 5000):
            pipe = self.redis.pipeline(transaction=False)
            for cid, phash in label_items[start : start + 5000]:
                pipe.hget(self.keys.prompt_group(phash), cid)
            for cid, _ in correction_items[start : start + 5000]:
                pipe.hgetall(self.keys.pairing_votes(cid))  # the voter's vote may sit under the anonymous field
            replies = pipe.execute()
            n_labels = len(label_items[start : start + 5000])
            for (cid, _), raw in zip(label_items[start : start + 5000], replies[:n_labels], strict=True):
                labels[cid] = parse_label(raw)
            for key, raw in zip(correction_items[start : start + 5000], replies[n_labels:], strict=True):
                for vote in parse_votes(_flat(raw)):
                    if vote.voter == key[1]:
                        corrections[key] = vote.correction_hash if vote.rating != "withdrawn" else ""
        return labels, corrections

    def prompt_group_labels(
        self, phashes: Iterable[str], newest: int = 1000, chunk: int = 500
    ) -> dict[str, dict[str, str]]:
        """The labelled completions of each prompt group, at most the newest `newest` liked and as many disliked
        ones (a prompt asked every day would otherwise grow without bound): phash -> {completion id: label}."""
        ordered = sorted(set(phashes))
        groups: dict[str, dict[str, str]] = {}
        for start in range(0, len(ordered), chunk):
            pipe = self.redis.pipeline(transaction=False)
            for phash in ordered[start : start + chunk]:
                pipe.zrevrange(self.keys.prompt_liked(phash), 0, newest - 1)
                pipe.zrevrange(self.keys.prompt_disliked(phash), 0, newest - 1)
            replies = pipe.execute()
            for i, phash in enumerate(ordered[start : start + chunk]):
                liked, disliked = replies[2 * i], replies[2 * i + 1]
                groups[phash] = {_text(cid): "like" for cid in liked} | {_text(cid): "dislike" for cid in disliked}
        return groups

    def labeled_voters(self, completion_ids: Sequence[str], labels: Sequence[str | None]) -> list[list[str]]:
        """The identities behind each completion's label (oldest first, at most 20), in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for cid in completion_ids:
            pipe.hgetall(self.keys.pairing_votes(cid))
        out = []
        for raw, label in zip(pipe.execute(), labels, strict=True):
            out.append(supporters(_flat(raw), label)[1] if label else [])
        return out

    def labeled_completions(self, chunk: int = 2000, newest: int = 0) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Every completion that ever had a label (newest > 0: the newest that many, by first label), with its
        current label (for the KTO export)."""
        start = max(0, int(self.redis.zcard(self.keys.labeled_completions)) - newest) if newest > 0 else 0
        while True:
            ids: Any = self.redis.zrange(self.keys.labeled_completions, start, start + chunk - 1)
            if not ids:
                return
            cids = [i.decode() if isinstance(i, bytes) else i for i in ids]
            records = self.completions(cids)
            pipe = self.redis.pipeline(transaction=False)
            ordered = [records[c] for c in cids if c in records]
            for record in ordered:
                pipe.hget(self.keys.prompt_group(record["prompt_hash"]), record["completion_id"])
            for record, raw in zip(ordered, pipe.execute(), strict=True):
                yield record, parse_label(raw)
            start += chunk
