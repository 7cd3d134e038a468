"""Redis side of pairing: the atomic vote script, idempotent pair writes, and reading pairs back.

Why Lua: a vote changes several keys of one prompt group (the identity's vote, the completion's majority
label, the liked/disliked sets) and must read the result back. Doing it in one script makes each vote
atomic, so any number of consumers can process events at once without racing on a prompt group, and it is
one command per event inside a pipelined batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import ResponseError

from services.store.keys import Keys
from workers.pairing import PairRecord

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # redis-py's own pipeline is used instead
    _pack_command = None

# KEYS: 1 votes(cid) 2 prompt_group(ph) 3 prompt_liked(ph) 4 prompt_disliked(ph) 5 pairing_completion(cid)
#       6 labeled_completions
# ARGV: 1 cid 2 identity 3 rating 4 created_at 5 feedback_id 6 correction hash 7 completion JSON
#       8 most counterparts returned
# A vote is stored as "created_at|feedback_id|rating|correction_hash" (no field may hold "|"; identities are
# hash fields, never inside values). The group hash maps completion id -> its majority label.
# Returns {label, counterparts, votes}: the completion's label after the vote, the newest responses to the
# same prompt currently labelled the other way, and (only when there are counterparts) the completion's
# votes as a flat HGETALL list. The reply does not depend on whether the vote was new, so a redelivered
# event re-derives the same pairs.
VOTE_SCRIPT = """
local cid, who, rating, ts, fid = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local nts = tonumber(ts)
redis.call('SET', KEYS[5], ARGV[7], 'NX')
local fresh = true
local cur = redis.call('HGET', KEYS[1], who)
if cur then
  local cts, cfid = string.match(cur, '^([^|]*)|([^|]*)|')
  cts = tonumber(cts)
  if cts > nts or (cts == nts and cfid >= fid) then fresh = false end
end
local label = redis.call('HGET', KEYS[2], cid) or ''
local votes = nil
if fresh then
  redis.call('HSET', KEYS[1], who, ts .. '|' .. fid .. '|' .. rating .. '|' .. ARGV[6])
  votes = redis.call('HGETALL', KEYS[1])
  local nl, nd = 0, 0
  for i = 2, #votes, 2 do
    local r = string.match(votes[i], '^[^|]*|[^|]*|([^|]*)')
    if r == 'like' then nl = nl + 1 elseif r == 'dislike' then nd = nd + 1 end
  end
  local old = label
  if nl > nd then label = 'like' elseif nd > nl then label = 'dislike' else label = '' end
  if label ~= old then
    redis.call('HSET', KEYS[2], cid, label)
    if old == 'like' then redis.call('ZREM', KEYS[3], cid)
    elseif old == 'dislike' then redis.call('ZREM', KEYS[4], cid) end
  end
  if label == 'like' then redis.call('ZADD', KEYS[3], nts, cid)
  elseif label == 'dislike' then redis.call('ZADD', KEYS[4], nts, cid) end
  if label ~= '' and old == '' then redis.call('ZADD', KEYS[6], 'NX', nts, cid) end
end
local others = {}
local k = tonumber(ARGV[8]) - 1
if k >= 0 then
  if label == 'like' then others = redis.call('ZREVRANGE', KEYS[4], 0, k)
  elseif label == 'dislike' then others = redis.call('ZREVRANGE', KEYS[3], 0, k) end
end
if #others > 0 then
  if votes == nil then votes = redis.call('HGETALL', KEYS[1]) end
else
  votes = {}
end
return {label, others, votes}
"""

# KEYS: 1 pair (or dropped-marker) key 2 pairs_index 3 pairs_seq 4 pairs_stats
# ARGV: 1 pair id 2 value 3 '1' to index the pair 4.. field, increment, field, increment ...
# Counters move only when the key is new, so a redelivered event never counts twice.
RECORD_PAIR_SCRIPT = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX') then
  if ARGV[3] == '1' then
    local seq = redis.call('INCR', KEYS[3])
    redis.call('ZADD', KEYS[2], seq, ARGV[1])
  end
  for i = 4, #ARGV, 2 do redis.call('HINCRBY', KEYS[4], ARGV[i], ARGV[i + 1]) end
  return 1
end
return 0
"""


class CommandBatch:
    """Commands sent to Redis in one write and answered in order: a pipeline without redis-py's
    per-command encoding and reply callbacks (with hiredis, packing costs about a third). Error replies
    come back as ResponseError instances in place, never raised."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def add(self, *args: Any) -> None:
        self.commands.append(args)

    def __len__(self) -> int:
        return len(self.commands)

    def execute(self, redis: Redis) -> list[Any]:
        if not self.commands:
            return []
        if _pack_command is None:
            pipe = redis.pipeline(transaction=False)
            for args in self.commands:
                pipe.execute_command(*args)
            return pipe.execute(raise_on_error=False)
        pool = redis.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(map(_pack_command, self.commands))])
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


def parse_vote(raw: bytes | str) -> tuple[float, str, str, str]:
    """(created_at, feedback_id, rating, correction_hash) from a stored vote."""
    ts, fid, rating, correction = _text(raw).split("|", 3)
    return float(ts), fid, rating, correction


def tally(votes: Sequence[bytes | str], limit: int = 20) -> tuple[str | None, list[str], list[str]]:
    """From a completion's votes (flat HGETALL list): its majority label and the feedback ids and
    identities of the votes behind that label, oldest first (at most limit)."""
    likes: list[tuple[str, str, str]] = []
    dislikes: list[tuple[str, str, str]] = []
    for i in range(0, len(votes), 2):
        ts, fid, rating, _ = _text(votes[i + 1]).split("|", 3)
        if rating == "like":
            likes.append((ts, fid, _text(votes[i])))
        elif rating == "dislike":
            dislikes.append((ts, fid, _text(votes[i])))
    if len(likes) > len(dislikes):
        label, rows = "like", likes
    elif len(dislikes) > len(likes):
        label, rows = "dislike", dislikes
    else:
        return None, [], []
    rows.sort(key=lambda row: (float(row[0]), row[1]))
    rows = rows[:limit]
    return label, [fid for _, fid, _ in rows], [who for _, _, who in rows]


def supporters(votes: Sequence[bytes | str], rating: str | None, limit: int = 20) -> tuple[list[str], list[str]]:
    """(feedback ids, identities) of the votes with this rating, oldest first (at most limit)."""
    rows = []
    for i in range(0, len(votes), 2):
        ts, fid, vote, _ = _text(votes[i + 1]).split("|", 3)
        if vote == rating:
            rows.append((float(ts), fid, _text(votes[i])))
    rows.sort()
    return [fid for _, fid, _ in rows[:limit]], [who for _, _, who in rows[:limit]]


def parse_label(raw: bytes | str | None) -> str | None:
    return _text(raw) or None if raw else None


@dataclass(slots=True)
class VoteOutcome:
    label: str | None
    counterparts: list[str]  # completion ids labelled the other way, newest first
    votes: list[bytes]  # this completion's votes (flat HGETALL), only when there are counterparts

    @classmethod
    def parse(cls, reply: Sequence[Any]) -> VoteOutcome:
        return cls(parse_label(reply[0]), [_text(c) for c in reply[1]], list(reply[2]))


class PairsStore:
    """Pair storage on one Redis client and key prefix."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.vote_script = redis.register_script(VOTE_SCRIPT)
        self.record_script = redis.register_script(RECORD_PAIR_SCRIPT)

    def ensure_scripts(self) -> None:
        """Load the scripts so pipelined EVALSHA calls never hit NOSCRIPT."""
        self.redis.script_load(VOTE_SCRIPT)
        self.redis.script_load(RECORD_PAIR_SCRIPT)

    # --- writes (queued on a CommandBatch) ---

    def queue_vote(
        self,
        batch: CommandBatch,
        *,
        completion_id: str,
        phash: str,
        identity: str,
        rating: str,
        created_at: float,
        feedback_id: str,
        correction_hash: str,
        completion_json: bytes,
        max_counterparts: int,
    ) -> None:
        k = self.keys
        batch.add(
            "EVALSHA",
            self.vote_script.sha,
            6,
            k.pairing_votes(completion_id),
            k.prompt_group(phash),
            k.prompt_liked(phash),
            k.prompt_disliked(phash),
            k.pairing_completion(completion_id),
            k.labeled_completions,
            completion_id,
            identity,
            rating,
            repr(created_at),
            feedback_id,
            correction_hash,
            completion_json,
            max_counterparts,
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
        args: list[Any] = [pid, reason_field, "0"]
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
            for cid, who in correction_items[start : start + 5000]:
                pipe.hget(self.keys.pairing_votes(cid), who)
            replies = pipe.execute()
            n_labels = len(label_items[start : start + 5000])
            for (cid, _), raw in zip(label_items[start : start + 5000], replies[:n_labels], strict=True):
                labels[cid] = parse_label(raw)
            for key, raw in zip(correction_items[start : start + 5000], replies[n_labels:], strict=True):
                if raw:
                    _, _, rating, correction = parse_vote(raw)
                    corrections[key] = correction if rating != "withdrawn" else ""
        return labels, corrections

    def labeled_completions(self, chunk: int = 2000) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Every completion that ever had a label, with its current label (for the KTO export)."""
        start = 0
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
