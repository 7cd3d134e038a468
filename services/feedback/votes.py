"""Votes in Redis: one Lua script checks the rate limits and writes the vote, its history entry and the
stream event atomically, so a vote is either wholly recorded or not at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from services.core.keys import Keys
from services.feedback.batching import ScriptBatcher

# One round trip per vote. The script reads the interaction (or takes it from ARGV when it is still in the
# API's write buffer), checks that its owner is the user the feedback token was verified for, checks the
# rate limits, then writes the vote, its history entry and the stream event. The event embeds the stored
# interaction verbatim, so the record is built from the server's own data, never from the client's.
# Token buckets are hashes {tokens, ts}; a request needs one token from the voter's and the IP's bucket,
# and from its app's bucket when the completion was made with an app key (the record's "app"; its
# "vote_rate", when not negative, overrides the default rate; the key is built here from ARGV[15], so this
# script assumes a single Redis, not a cluster). The vote is stored under ARGV[1], the voter's field: the
# user for a completion made for one, a fixed field otherwise (one vote per completion token).
# Nothing is written when a check fails. A vote identical to the voter's current one is a no-op (it still
# spends a token, so replays cannot hammer the server for free).
_VOTE = """
local votes, history, stream, user_bucket, ip_bucket, interaction =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local voter, state, head, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local user_rate, user_burst = tonumber(ARGV[5]), tonumber(ARGV[6])
local ip_rate, ip_burst = tonumber(ARGV[7]), tonumber(ARGV[8])
local ttl, maxlen, withdraw = tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11] == "1"
local has_claim, claim, record = ARGV[12] == "1", ARGV[13], ARGV[14]
local app_bucket_prefix, app_rate, app_burst = ARGV[15], tonumber(ARGV[16]), tonumber(ARGV[17])

if record == "" then record = redis.call('GET', interaction) end
if not record then return {'missing'} end
local rec = cjson.decode(record)
local owner, adapter = rec['user'], rec['adapter']
if owner == cjson.null or owner == "" then owner = nil end
if type(adapter) ~= 'string' then adapter = '' end
if (has_claim and owner ~= claim) or (not has_claim and owner ~= nil) then return {'bad_token'} end

local function level(key, rate, burst)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]) or burst, tonumber(b[2]) or now
  return math.min(burst, tokens + math.max(0, now - ts) * rate)
end
local ut = level(user_bucket, user_rate, user_burst)
local it = level(ip_bucket, ip_rate, ip_burst)
if ut < 1 then return {'rate_limited', 'user', tostring((1 - ut) / user_rate)} end
if it < 1 then return {'rate_limited', 'ip', tostring((1 - it) / ip_rate)} end
local app, app_bucket, at = rec['app'], nil, 0
if type(app) == 'string' and app ~= '' and app_bucket_prefix ~= '' then
  local own = tonumber(rec['vote_rate'])
  if own and own >= 0 then app_rate = own end
  if app_rate > 0 then
    app_bucket = app_bucket_prefix .. app
    at = level(app_bucket, app_rate, app_burst)
    if at < 1 then return {'rate_limited', 'app', tostring((1 - at) / app_rate)} end
  end
end
redis.call('HSET', user_bucket, 'tokens', ut - 1, 'ts', now)
redis.call('EXPIRE', user_bucket, math.ceil(user_burst / user_rate) + 60)
redis.call('HSET', ip_bucket, 'tokens', it - 1, 'ts', now)
redis.call('EXPIRE', ip_bucket, math.ceil(ip_burst / ip_rate) + 60)
if app_bucket then
  redis.call('HSET', app_bucket, 'tokens', at - 1, 'ts', now)
  redis.call('EXPIRE', app_bucket, math.ceil(app_burst / app_rate) + 60)
end

local current = redis.call('HGET', votes, voter)
if withdraw then
  if not current then return {'unchanged', '', adapter} end
  redis.call('HDEL', votes, voter)
else
  if current == state then return {'unchanged', '', adapter} end
  redis.call('HSET', votes, voter, state)
end
redis.call('EXPIRE', votes, ttl)
local event = string.sub(head, 1, -2) .. ',"interaction":' .. record .. '}'
redis.call('RPUSH', history, event)
redis.call('EXPIRE', history, ttl)
local id
if maxlen > 0 then
  id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event)
else
  id = redis.call('XADD', stream, '*', 'event', event)
end
if type(app) ~= 'string' then app = '' end
return {'recorded', id, adapter, app}
"""


@dataclass(frozen=True)
class Limits:
    user_rate: float
    user_burst: int
    ip_rate: float
    ip_burst: int
    app_rate: float = 0.0  # votes/s per app (0: no app quota unless a key sets its own)
    app_burst: int = 1000


@dataclass(frozen=True)
class VoteOutcome:
    status: str  # recorded | unchanged | rate_limited | missing (no such interaction) | bad_token
    stream_id: str | None = None
    adapter: str | None = None  # the rated completion's adapter
    limited_by: str | None = None
    retry_after_s: float = 0.0
    app: str | None = None  # the rated completion's app (auth on)


class FeedbackStore:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: int, limits: Limits, stream_maxlen: int = 0):
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self.limits = limits
        self.stream_maxlen = stream_maxlen
        self._script = ScriptBatcher(redis, _VOTE)

    async def vote(
        self,
        completion_id: str,
        voter: str,
        ip_hash: str,
        state: dict[str, Any] | None,
        event_head: dict[str, Any],
        now: float,
        *,
        token_user: str | None,
        record: bytes | None = None,
        field: str | None = None,
    ) -> VoteOutcome:
        """Record a vote (state) or withdraw it (state None), with its stream event, atomically.

        token_user: the user the feedback token was verified for (None: a completion without a user);
        the stored interaction must belong to them. record: the interaction's JSON when it is not in Redis
        yet (the API's write buffer). The event is event_head plus the interaction under "interaction".
        field: where the vote is stored in the completion's votes hash (default: voter, whose rate bucket
        is spent either way).
        """
        lim = self.limits
        result = await self._script(
            keys=[
                self.keys.votes(completion_id),
                self.keys.vote_history(completion_id),
                self.keys.feedback_stream,
                self.keys.rate_limit("user", voter),
                self.keys.rate_limit("ip", ip_hash),
                self.keys.interaction(completion_id),
            ],
            args=[
                field or voter,
                _canonical(state) if state is not None else b"",
                orjson.dumps(event_head),
                repr(now),
                lim.user_rate,
                lim.user_burst,
                lim.ip_rate,
                lim.ip_burst,
                self.ttl_s,
                self.stream_maxlen,
                "1" if state is None else "0",
                "0" if token_user is None else "1",
                token_user or "",
                record or b"",
                self.keys.rate_limit("app", ""),
                lim.app_rate,
                lim.app_burst,
            ],
        )
        status = result[0].decode()
        if status == "rate_limited":
            return VoteOutcome(status, limited_by=result[1].decode(), retry_after_s=float(result[2]))
        if len(result) < 3:
            return VoteOutcome(status)
        app = result[3].decode() or None if len(result) > 3 else None
        return VoteOutcome(status, stream_id=result[1].decode() or None, adapter=result[2].decode() or None, app=app)

    async def aclose(self) -> None:
        await self._script.aclose()

    async def current(self, completion_id: str, voter: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(self.keys.votes(completion_id), voter)
        return orjson.loads(raw) if raw else None


def _canonical(state: dict[str, Any]) -> bytes:
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)
