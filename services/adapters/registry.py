"""The adapter registry in Redis: versions, their status and lineage, and atomic promotions.

One module (over 400 lines): the sync registry (workers, CLI) and the async one (API replicas) run the same
Lua transitions, which must not drift apart.

One hash per version (Keys.adapter(version)), a sorted set of every version by registration time
(Keys.adapters_index), and three pointers: Keys.active_adapter, Keys.previous_adapter and Keys.adapter_pin.
Versions are immutable names, ``feedloop-v{N}`` with N from an INCR counter (Keys.adapters_seq).

Status of a version, and what moves it::

    candidate --promote/pin--> active --promote(other)--> previous --promote(other)--> retired
                                  |                          |
                                  +--rollback--> retired     +--rollback--> active
    any --reject(reason)--> rejected       (a rejected version is never promoted again)

* ``promote(V)``: V becomes active, the old active becomes previous, the old previous is retired. Publishes
  ``{"version", "path", "at", "by"}`` on Keys.promotions_channel.
* ``rollback()``: the previous version becomes active again and the rolled-back one is **retired** (not made
  previous): rolling back says "this version is bad", so it is unloaded and not one more rollback away.
  The previous slot is then empty until the next promotion. A retired version can be promoted explicitly.
* ``pin(V)``: promote V and set the pin; while a pin is set, auto-promotion (``promote(..., auto=True)``)
  leaves new versions as candidates. Manual promote and rollback still work and keep the pin; only
  ``unpin()`` clears it.
* ``promote(V, auto=True, canary_share=s)`` with s > 0 (``canary.share``): V becomes the **canary**
  (Keys.canary_adapter; its record keeps ``canary_of``, the active version it is compared to, the share and
  ``canary_started_at``). One canary at a time: another candidate stays a candidate (``canary_busy``). Replicas
  load it and route that share of users to it; the decision task (workers/evaluation/canary_check.py) then
  ``promote_canary(V, decision)`` (V active as by promote) or ``abort_canary(V, reasons, decision)`` (V
  retired, or rejected with a code on a hard failure); the ending and its numbers stay in V's record
  (``canary_outcome``, ``canary_decision``, ``reasons``). A manual ``promote`` of V ends its canary the same
  way; promoting another version retires the canary (``superseded``); ``rollback()`` while a canary runs ends
  the canary and leaves the active version alone; rejecting the canary (a replica failed its checks) ends it.
* ``reject(V, reasons)``: V is marked rejected with its reasons. If V was active (a replica failed to load
  it after promotion), the previous version is restored as active (``by: "revert"``; the base model if
  there is none) and that is published too, so every replica converges on what actually serves.

Every transition is one Lua script, so it is atomic against concurrent promotions, replicas and workers.
A training run's writes can be fenced: with ``fence=(lease key, lease value)`` the script refuses the
write unless the training lease still holds that value (a stale run cannot register or promote).
A canary also owns a consumer group (CANARY_GROUP) on the feedback stream from its start to its end, so the
decision task sees every vote cast during the canary. The scripts build adapter hash keys from a prefix, so
the registry needs a single Redis (not Cluster).

The same scripts serve a sync client (CLI, Celery tasks: :class:`AdapterRegistry`) and an asyncio client
(API replicas: :class:`AsyncAdapterRegistry`).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, Unpack

from services.core.counters import highest_on_disk, next_number, next_number_async
from services.core.keys import Keys

Status = Literal["candidate", "canary", "active", "previous", "retired", "rejected"]
STATUSES: tuple[Status, ...] = ("candidate", "canary", "active", "previous", "retired", "rejected")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
Fence = tuple[str, str]  # (lease key, the value the lease must still hold)
CANARY_GROUP = "canary"  # the canary's consumer group on the feedback stream (created and destroyed by the scripts)

# Prepended to every transition script: the fencing check, making a version active, announcing the change.
_LUA_HELPERS = """
local function stale(fence_key, fence_value)
  return fence_value ~= '' and redis.call('GET', fence_key) ~= fence_value
end
local function activate(active_key, prefix, version, now, by)
  redis.call('HSET', prefix .. version, 'status', 'active', 'status_at', now, 'promoted_at', now,
    'activated_by', by)
  redis.call('SET', active_key, version)
  return redis.call('HGET', prefix .. version, 'path') or ''
end
local function announce(channel, version, path, now, by, reverted)
  redis.call('PUBLISH', channel,
    cjson.encode({version = version, path = path, at = tonumber(now), by = by, reverted = reverted}))
end
-- The canary's own consumer group on the feedback stream, created when the canary starts: the decision task
-- reads every vote from the first one on (the stream is trimmed only below what every group acknowledged).
local CANARY_GROUP = 'canary'
local function end_canary(canary_key, prefix, canary, outcome, now, by, reasons, decision, channel, stream)
  -- the canary ends (promoted, rolled back, rejected or superseded): its record keeps how and why
  redis.pcall('XGROUP', 'DESTROY', stream, CANARY_GROUP)
  local fields = {'canary_ended_at', now, 'canary_outcome', outcome, 'canary_ended_by', by}
  if reasons ~= '' then fields[#fields + 1] = 'reasons'; fields[#fields + 1] = reasons end
  if decision ~= '' then fields[#fields + 1] = 'canary_decision'; fields[#fields + 1] = decision end
  redis.call('HSET', prefix .. canary, unpack(fields))
  redis.call('DEL', canary_key)
  redis.call('PUBLISH', channel, cjson.encode({canary = canary, event = 'canary_' .. outcome, at = tonumber(now),
    by = by}))
end
"""

# KEYS: adapter hash, index, seq, fence key. ARGV: version, number ('' if none), fence value, now,
# then field/value pairs.
_REGISTER = """
if stale(KEYS[4], ARGV[3]) then return {'stale', ''} end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'exists', redis.call('HGET', KEYS[1], 'run_id') or ''}
end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
if ARGV[2] ~= '' and tonumber(redis.call('GET', KEYS[3]) or '0') < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[3], ARGV[2])
end
return {'registered', ''}
"""

# KEYS: active, previous, pin, fence key, canary, feedback stream. ARGV: version, adapter key prefix, now, by,
# mode (manual|auto|pin|canary), fence value, channel, canary share (auto: > 0 starts a canary), decision JSON.
# mode 'canary' promotes only the running canary (the decision task: refused once an operator ended it).
_PROMOTE = """
if stale(KEYS[4], ARGV[6]) then return {'stale', ''} end
local prefix, version, now = ARGV[2], ARGV[1], ARGV[3]
local target = prefix .. version
if redis.call('EXISTS', target) == 0 then return {'unknown', ''} end
if redis.call('HGET', target, 'status') == 'rejected' then return {'rejected', ''} end
if ARGV[5] == 'auto' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {'pinned', redis.call('GET', KEYS[3])}
end
local canary = redis.call('GET', KEYS[5])
if ARGV[5] == 'canary' and canary ~= version then return {'not_canary', canary or ''} end
if ARGV[5] == 'pin' then redis.call('SET', KEYS[3], version) end
local active = redis.call('GET', KEYS[1])
if active == version then return {'unchanged', ''} end
if ARGV[5] == 'auto' and tonumber(ARGV[8]) > 0 then
  if canary == version then return {'unchanged', ''} end
  if canary then return {'canary_busy', canary} end
  redis.call('HSET', target, 'status', 'canary', 'status_at', now, 'canary_of', active or '', 'canary_share',
    ARGV[8], 'canary_started_at', now, 'canary_by', ARGV[4], 'canary_outcome', '', 'canary_ended_at', '')
  redis.call('SET', KEYS[5], version)
  redis.pcall('XGROUP', 'DESTROY', KEYS[6], CANARY_GROUP)
  redis.call('XGROUP', 'CREATE', KEYS[6], CANARY_GROUP, '$', 'MKSTREAM')
  redis.call('PUBLISH', ARGV[7], cjson.encode({canary = version, event = 'canary_started', at = tonumber(now),
    by = ARGV[4]}))
  return {'canary', active or ''}
end
if canary == version then
  end_canary(KEYS[5], prefix, canary, 'promoted', now, ARGV[4], '', ARGV[9], ARGV[7], KEYS[6])
elseif canary then
  redis.call('HSET', prefix .. canary, 'status', 'retired', 'status_at', now)
  end_canary(KEYS[5], prefix, canary, 'superseded', now, ARGV[4], cjson.encode({'superseded: ' .. version ..
    ' was promoted'}), '', ARGV[7], KEYS[6])
end
local previous = redis.call('GET', KEYS[2])
if previous and previous ~= version then
  redis.call('HSET', prefix .. previous, 'status', 'retired', 'status_at', now)
end
if active then
  redis.call('HSET', prefix .. active, 'status', 'previous', 'status_at', now)
  redis.call('SET', KEYS[2], active)
else
  redis.call('DEL', KEYS[2])
end
announce(ARGV[7], version, activate(KEYS[1], prefix, version, now, ARGV[4]), now, ARGV[4])
return {'promoted', active or ''}
"""

# KEYS: active, previous, canary, feedback stream. ARGV: adapter key prefix, now, channel, by.
# While a canary runs, a rollback ends the canary (retired) and leaves the active version where it is.
_ROLLBACK = """
local prefix, now = ARGV[1], ARGV[2]
local canary = redis.call('GET', KEYS[3])
if canary then
  redis.call('HSET', prefix .. canary, 'status', 'retired', 'status_at', now, 'rolled_back_at', now)
  end_canary(KEYS[3], prefix, canary, 'rolled_back', now, ARGV[4], cjson.encode({'rolled back by ' .. ARGV[4]}), '',
    ARGV[3], KEYS[4])
  return {'canary_aborted', redis.call('GET', KEYS[1]) or '', canary}
end
local previous = redis.call('GET', KEYS[2])
if not previous then return {'no_previous', ''} end
local active = redis.call('GET', KEYS[1])
if active then
  redis.call('HSET', prefix .. active, 'status', 'retired', 'status_at', now, 'rolled_back_at', now)
end
local path = activate(KEYS[1], prefix, previous, now, ARGV[4])
redis.call('DEL', KEYS[2])
announce(ARGV[3], previous, path, now, ARGV[4])
return {'rolled_back', previous, active or ''}
"""

# KEYS: adapter hash, active, previous, fence key, canary, feedback stream. ARGV: version, adapter key prefix,
# now, reasons JSON, code, by, channel, fence value.
_REJECT = """
if stale(KEYS[4], ARGV[8]) then return {'stale', ''} end
local version, prefix, now = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
if redis.call('HGET', KEYS[1], 'status') == 'rejected' then return {'unchanged', ''} end
redis.call('HSET', KEYS[1], 'status', 'rejected', 'status_at', now, 'reasons', ARGV[4],
  'reject_code', ARGV[5], 'rejected_by', ARGV[6])
if redis.call('GET', KEYS[3]) == version then redis.call('DEL', KEYS[3]) end
if redis.call('GET', KEYS[5]) == version then
  end_canary(KEYS[5], prefix, version, 'rejected', now, ARGV[6], '', '', ARGV[7], KEYS[6])
  return {'rejected', ''}
end
if redis.call('GET', KEYS[2]) ~= version then return {'rejected', ''} end
local previous = redis.call('GET', KEYS[3])
local path = ''
if previous then
  path = activate(KEYS[2], prefix, previous, now, 'revert')
  redis.call('DEL', KEYS[3])
else
  redis.call('DEL', KEYS[2])
end
announce(ARGV[7], previous or cjson.null, path, now, 'revert', version)
return {'reverted', previous or ''}
"""

# KEYS: canary, feedback stream. ARGV: adapter key prefix, expected version ('' any), status (retired|rejected),
# reasons JSON, decision JSON, now, by, channel, reject code. Ends the canary without touching the active version.
_ABORT_CANARY = """
local prefix, now = ARGV[1], ARGV[6]
local canary = redis.call('GET', KEYS[1])
if not canary then return {'no_canary', ''} end
if ARGV[2] ~= '' and canary ~= ARGV[2] then return {'not_canary', canary} end
redis.call('HSET', prefix .. canary, 'status', ARGV[3], 'status_at', now, 'rolled_back_at', now)
if ARGV[3] == 'rejected' then
  redis.call('HSET', prefix .. canary, 'reject_code', ARGV[9], 'rejected_by', ARGV[7])
end
end_canary(KEYS[1], prefix, canary, 'rolled_back', now, ARGV[7], ARGV[4], ARGV[5], ARGV[8], KEYS[2])
return {'rolled_back', canary}
"""

# KEYS: adapter hash. ARGV: now, by. An operator's second look at a rejected version (`feedloop adapters
# revalidate`, after its content checks passed again): it becomes a candidate, its earlier reasons are kept.
_REVALIDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown', ''} end
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'rejected' then return {'not_rejected', status} end
redis.call('HSET', KEYS[1], 'status', 'candidate', 'status_at', ARGV[1], 'revalidated_at', ARGV[1],
  'revalidated_by', ARGV[2], 'rejected_reasons', redis.call('HGET', KEYS[1], 'reasons') or '[]',
  'reasons', '[]', 'reject_code', '')
return {'revalidated', ''}
"""

# KEYS: index, active, previous, pin, canary. ARGV: adapter key prefix, 'all' or 'serving'.
_READ = """
local out = {}
for i = 2, 5 do out[#out + 1] = redis.call('GET', KEYS[i]) or '' end
local versions
if ARGV[2] == 'all' then
  versions = redis.call('ZRANGE', KEYS[1], 0, -1)
else
  versions = {}
  if out[1] ~= '' then versions[#versions + 1] = out[1] end
  if out[2] ~= '' then versions[#versions + 1] = out[2] end
  if out[4] ~= '' then versions[#versions + 1] = out[4] end
end
for _, v in ipairs(versions) do out[#out + 1] = redis.call('HGETALL', ARGV[1] .. v) end
return out
"""


class RegistryError(Exception):
    """A registry operation was refused; ``code`` is a stable string (API error codes use it)."""

    code = "registry_error"


class UnknownVersion(RegistryError):
    code = "adapter_not_found"


class VersionRejected(RegistryError):
    code = "adapter_rejected"


class VersionExists(RegistryError):
    code = "adapter_exists"


class NoPrevious(RegistryError):
    code = "no_previous_adapter"


class StaleFence(RegistryError):
    """The training lease no longer holds the caller's fencing token: its write is refused."""

    code = "stale_fencing_token"


class InvalidVersion(RegistryError):
    code = "invalid_version"


class NoCanary(RegistryError):
    """No canary runs (or another version is the canary now)."""

    code = "no_canary"


class Registration(TypedDict, total=False):
    """What ``register`` records besides the version and its path; every item is optional."""

    status: Status  # "candidate" (the default) or "rejected"
    run_id: str | None
    dataset_version: str | None
    parent: str | None
    metrics: dict[str, Any] | None
    gate: dict[str, Any] | None
    reasons: list[str] | None
    reject_code: str | None
    fence: Fence | None


@dataclass(frozen=True)
class AdapterRecord:
    version: str
    status: Status
    path: str
    number: int | None = None
    run_id: str | None = None
    dataset_version: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    reject_code: str | None = None
    rejected_by: str | None = None
    activated_by: str | None = None
    created_at: float | None = None
    status_at: float | None = None
    promoted_at: float | None = None
    rolled_back_at: float | None = None
    revalidated_at: float | None = None
    # canary (status "canary" while it serves a share of users; kept after it ended)
    canary_of: str | None = None  # the active version it was compared to (None: the base model)
    canary_share: float | None = None
    canary_started_at: float | None = None
    canary_ended_at: float | None = None
    canary_outcome: str | None = None  # promoted | rolled_back | rejected | superseded
    canary_decision: dict[str, Any] = field(default_factory=dict)  # the decision that ended it, with its numbers
    canary_check: dict[str, Any] = field(default_factory=dict)  # the latest check's numbers

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class RegistryView:
    active: str | None
    previous: str | None
    pinned: str | None
    adapters: list[AdapterRecord]
    canary: str | None = None

    def get(self, version: str | None) -> AdapterRecord | None:
        return next((a for a in self.adapters if a.version == version), None) if version else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "previous": self.previous,
            "pinned": self.pinned,
            "canary": self.canary,
            "auto_promotion": self.pinned is None,
            "adapters": [a.to_dict() for a in self.adapters],
        }


@dataclass(frozen=True)
class Promotion:
    """What promote/pin/rollback did: ``promoted``, ``unchanged`` (already active), ``pinned`` (auto-promotion
    skipped: ``previous`` then names the pinned version), ``rolled_back``, ``canary`` (auto-promotion started a
    canary: ``previous`` names the active version it is compared to), ``canary_busy`` (another canary runs:
    ``previous`` names it; the version stays a candidate), ``canary_aborted`` (a rollback ended the running
    canary: ``version`` is the unchanged active one, ``previous`` the canary)."""

    outcome: str
    version: str | None
    previous: str | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def parse_record(raw: Any) -> AdapterRecord | None:
    """An AdapterRecord from HGETALL (a dict) or a Lua-returned flat list; None if empty."""
    if not raw:
        return None
    if isinstance(raw, dict):
        fields = {_text(k): _text(v) for k, v in raw.items()}
    else:
        flat = [_text(item) for item in raw]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
    return AdapterRecord(
        version=fields["version"],
        status=fields.get("status", "candidate"),  # type: ignore[arg-type]
        path=fields.get("path", ""),
        number=int(fields["number"]) if fields.get("number") else None,
        run_id=fields.get("run_id") or None,
        dataset_version=fields.get("dataset_version") or None,
        parent=fields.get("parent") or None,
        metrics=json.loads(fields.get("metrics") or "{}"),
        gate=json.loads(fields.get("gate") or "{}"),
        reasons=json.loads(fields.get("reasons") or "[]"),
        reject_code=fields.get("reject_code") or None,
        rejected_by=fields.get("rejected_by") or None,
        activated_by=fields.get("activated_by") or None,
        created_at=_float(fields.get("created_at")),
        status_at=_float(fields.get("status_at")),
        promoted_at=_float(fields.get("promoted_at")),
        rolled_back_at=_float(fields.get("rolled_back_at")),
        revalidated_at=_float(fields.get("revalidated_at")),
        canary_of=fields.get("canary_of") or None,
        canary_share=_float(fields.get("canary_share")),
        canary_started_at=_float(fields.get("canary_started_at")),
        canary_ended_at=_float(fields.get("canary_ended_at")),
        canary_outcome=fields.get("canary_outcome") or None,
        canary_decision=json.loads(fields.get("canary_decision") or "{}"),
        canary_check=json.loads(fields.get("canary_check") or "{}"),
    )


def _parse_view(reply: list[Any]) -> RegistryView:
    active, previous, pinned, canary = (_text(v) or None for v in reply[:4])
    records = [r for r in (parse_record(raw) for raw in reply[4:]) if r is not None]
    return RegistryView(active, previous, pinned, records, canary)


def _refuse_stale_or_unknown(outcome: str, doing: str, version: str) -> None:
    if outcome == "stale":
        raise StaleFence(f"the training lease moved on: {doing} {version} is refused")
    if outcome == "unknown":
        raise UnknownVersion(f"no adapter version {version!r} in the registry")


def _promotion(reply: list[Any], version: str) -> Promotion:
    outcome, other = _text(reply[0]), _text(reply[1]) or None
    _refuse_stale_or_unknown(outcome, "promoting", version)
    if outcome == "rejected":
        raise VersionRejected(f"{version} was rejected and cannot be promoted")
    if outcome == "not_canary":
        raise NoCanary(f"{version} is not the running canary" + (f" ({other} is)" if other else ""))
    return Promotion(outcome, version, other)


def _rollback(reply: list[Any]) -> Promotion:
    outcome = _text(reply[0])
    if outcome == "no_previous":
        raise NoPrevious("there is no previous version to roll back to")
    return Promotion(outcome, _text(reply[1]) or None, _text(reply[2]) or None)


def _abort(reply: list[Any], version: str | None) -> str:
    outcome, canary = _text(reply[0]), _text(reply[1])
    if outcome == "no_canary":
        raise NoCanary("no canary is running")
    if outcome == "not_canary":
        raise NoCanary(f"{version} is not the running canary ({canary} is)")
    return canary


def _rejection(reply: list[Any], version: str) -> str:
    outcome = _text(reply[0])
    _refuse_stale_or_unknown(outcome, "rejecting", version)
    return outcome


def _registration(reply: list[Any], version: str, run_id: str | None) -> str:
    outcome, existing_run = _text(reply[0]), _text(reply[1])
    _refuse_stale_or_unknown(outcome, "registering", version)
    if outcome == "exists":
        if run_id is not None and existing_run == run_id:
            return "exists"  # the same run registering again (a redelivered task): idempotent
        raise VersionExists(f"adapter version {version!r} is already registered (versions are immutable)")
    return outcome


class _RegistryBase:
    """Builds the script calls; the sync and async classes only await (or not) and parse."""

    def __init__(self, redis: Any, keys: Keys, alias: str = "feedloop", reserved: tuple[str, ...] = ()) -> None:
        self.redis = redis
        self.keys = keys
        self.alias = alias
        self.reserved = {alias, *reserved}
        self._register = redis.register_script(_LUA_HELPERS + _REGISTER)
        self._promote = redis.register_script(_LUA_HELPERS + _PROMOTE)
        self._rollback = redis.register_script(_LUA_HELPERS + _ROLLBACK)
        self._reject = redis.register_script(_LUA_HELPERS + _REJECT)
        self._read = redis.register_script(_READ)
        self._revalidate = redis.register_script(_REVALIDATE)
        self._abort_canary = redis.register_script(_LUA_HELPERS + _ABORT_CANARY)
        self._number = re.compile(rf"^{re.escape(alias)}-v(\d+)$")

    @property
    def _prefix(self) -> str:
        return self.keys.adapter("")

    def version_name(self, number: int) -> str:
        return f"{self.alias}-v{number}"

    def _floor(self, adapters_dir: Path | str | None) -> int:
        return highest_on_disk([adapters_dir], rf"{re.escape(self.alias)}-v(\d+)") if adapters_dir else 0

    def _register_call(self, version: str, path: str, details: Registration) -> Any:
        if not VERSION_PATTERN.match(version) or version in self.reserved:
            raise InvalidVersion(f"{version!r} is not a valid adapter version name")
        status = details.get("status", "candidate")
        if status not in ("candidate", "rejected"):
            raise ValueError("a version is registered as a candidate or as rejected")
        match = self._number.match(version)
        now = repr(time.time())
        fields = {
            "version": version,
            "number": match.group(1) if match else "",
            "status": status,
            "path": path,
            "run_id": details.get("run_id") or "",
            "dataset_version": details.get("dataset_version") or "",
            "parent": details.get("parent") or "",
            "metrics": json.dumps(details.get("metrics") or {}),
            "gate": json.dumps(details.get("gate") or {}),
            "reasons": json.dumps(details.get("reasons") or []),
            "reject_code": details.get("reject_code") or "",
            "created_at": now,
            "status_at": now,
        }
        flat = [item for pair in fields.items() for item in pair]
        fence_key, fence_value = details.get("fence") or (self.keys.training_lease, "")
        return self._register(
            keys=[self.keys.adapter(version), self.keys.adapters_index, self.keys.adapters_seq, fence_key],
            args=[version, fields["number"], fence_value, now, *flat],
        )

    def _promote_call(
        self,
        version: str,
        mode: str,
        by: str,
        fence: Fence | None,
        canary_share: float = 0.0,
        decision: dict[str, Any] | None = None,
    ) -> Any:
        fence_key, fence_value = fence or (self.keys.training_lease, "")
        return self._promote(
            keys=[
                self.keys.active_adapter,
                self.keys.previous_adapter,
                self.keys.adapter_pin,
                fence_key,
                self.keys.canary_adapter,
                self.keys.feedback_stream,
            ],
            args=[
                version,
                self._prefix,
                repr(time.time()),
                by,
                mode,
                fence_value,
                self.keys.promotions_channel,
                repr(float(canary_share)),
                json.dumps(decision) if decision else "",
            ],
        )

    def _rollback_call(self, by: str) -> Any:
        return self._rollback(
            keys=[
                self.keys.active_adapter,
                self.keys.previous_adapter,
                self.keys.canary_adapter,
                self.keys.feedback_stream,
            ],
            args=[self._prefix, repr(time.time()), self.keys.promotions_channel, by],
        )

    def _abort_call(
        self,
        version: str | None,
        reasons: list[str],
        decision: dict[str, Any] | None,
        by: str,
        code: str | None,
    ) -> Any:
        return self._abort_canary(
            keys=[self.keys.canary_adapter, self.keys.feedback_stream],
            args=[
                self._prefix,
                version or "",
                "rejected" if code else "retired",
                json.dumps(reasons),
                json.dumps(decision) if decision else "",
                repr(time.time()),
                by,
                self.keys.promotions_channel,
                code or "",
            ],
        )

    def _reject_call(self, version: str, reasons: list[str], code: str, by: str, fence: Fence | None) -> Any:
        fence_key, fence_value = fence or (self.keys.training_lease, "")
        return self._reject(
            keys=[
                self.keys.adapter(version),
                self.keys.active_adapter,
                self.keys.previous_adapter,
                fence_key,
                self.keys.canary_adapter,
                self.keys.feedback_stream,
            ],
            args=[
                version,
                self._prefix,
                repr(time.time()),
                json.dumps(reasons),
                code,
                by,
                self.keys.promotions_channel,
                fence_value,
            ],
        )

    def _read_call(self, what: str) -> Any:
        return self._read(
            keys=[
                self.keys.adapters_index,
                self.keys.active_adapter,
                self.keys.previous_adapter,
                self.keys.adapter_pin,
                self.keys.canary_adapter,
            ],
            args=[self._prefix, what],
        )


class AdapterRegistry(_RegistryBase):
    """The registry for sync callers (CLI, Celery tasks). Methods mirror :class:`AsyncAdapterRegistry`."""

    def next_version(self, adapters_dir: Path | str | None = None) -> str:
        """The next version name; with adapters_dir, above every version folder there (Redis may have lost
        its counter while the adapters stayed on disk)."""
        return self.version_name(next_number(self.redis, self.keys.adapters_seq, self._floor(adapters_dir)))

    def register(self, version: str, path: str, **details: Unpack[Registration]) -> str:
        """Add a version (``registered``; ``exists`` when the same run registers it again)."""
        return _registration(self._register_call(version, path, details), version, details.get("run_id"))

    def promote(
        self,
        version: str,
        *,
        auto: bool = False,
        by: str | None = None,
        fence: Fence | None = None,
        canary_share: float = 0.0,
    ) -> Promotion:
        """Make V active; with auto=True and canary_share > 0, start V as the canary instead (``canary``)."""
        mode = "auto" if auto else "manual"
        return _promotion(self._promote_call(version, mode, by or mode, fence, canary_share), version)

    def promote_canary(self, version: str, decision: dict[str, Any] | None = None, by: str = "canary") -> Promotion:
        """The running canary V becomes active (NoCanary once it is not the canary any more)."""
        return _promotion(self._promote_call(version, "canary", by, None, decision=decision), version)

    def abort_canary(
        self,
        version: str | None = None,
        reasons: list[str] | None = None,
        decision: dict[str, Any] | None = None,
        by: str = "operator",
        code: str | None = None,
    ) -> str:
        """End the running canary (V, or whichever runs): retired, or rejected with ``code``. Returns it."""
        return _abort(self._abort_call(version, reasons or [], decision, by, code), version)

    def record_canary_check(self, version: str, check: dict[str, Any]) -> None:
        """Store a check's numbers on the canary's record (the latest only)."""
        self.redis.hset(self.keys.adapter(version), "canary_check", json.dumps(check))

    def pin(self, version: str, by: str = "pin") -> Promotion:
        return _promotion(self._promote_call(version, "pin", by, None), version)

    def unpin(self) -> str | None:
        pinned = self.redis.getdel(self.keys.adapter_pin)
        return _text(pinned) if pinned else None

    def rollback(self, by: str = "rollback") -> Promotion:
        return _rollback(self._rollback_call(by))

    def reject(
        self, version: str, reasons: list[str], code: str, by: str = "operator", fence: Fence | None = None
    ) -> str:
        """Mark a version rejected: ``rejected``, ``reverted`` (it was active), ``unchanged`` (already)."""
        return _rejection(self._reject_call(version, reasons, code, by, fence), version)

    def revalidate(self, version: str, by: str = "operator") -> str:
        """A rejected version becomes a candidate again (``revalidated``); replicas that failed it retry.
        Raises UnknownVersion; ``not_rejected:<status>`` when it was not rejected."""
        reply = self._revalidate(keys=[self.keys.adapter(version)], args=[repr(time.time()), by])
        outcome, status = (_text(v) for v in reply)
        _refuse_stale_or_unknown(outcome, "revalidating", version)
        return outcome if outcome == "revalidated" else f"{outcome}:{status}"

    def get(self, version: str) -> AdapterRecord | None:
        return parse_record(self.redis.hgetall(self.keys.adapter(version)))

    def view(self) -> RegistryView:
        return _parse_view(self._read_call("all"))

    def serving(self) -> RegistryView:
        """Only the active and previous versions (what a replica reconciles against)."""
        return _parse_view(self._read_call("serving"))


class AsyncAdapterRegistry(_RegistryBase):
    """The registry for asyncio callers (the API and its hot-swapper)."""

    async def next_version(self, adapters_dir: Path | str | None = None) -> str:
        floor = self._floor(adapters_dir)
        return self.version_name(await next_number_async(self.redis, self.keys.adapters_seq, floor))

    async def register(self, version: str, path: str, **details: Unpack[Registration]) -> str:
        return _registration(await self._register_call(version, path, details), version, details.get("run_id"))

    async def promote(
        self,
        version: str,
        *,
        auto: bool = False,
        by: str | None = None,
        fence: Fence | None = None,
        canary_share: float = 0.0,
    ) -> Promotion:
        mode = "auto" if auto else "manual"
        return _promotion(await self._promote_call(version, mode, by or mode, fence, canary_share), version)

    async def promote_canary(
        self, version: str, decision: dict[str, Any] | None = None, by: str = "canary"
    ) -> Promotion:
        return _promotion(await self._promote_call(version, "canary", by, None, decision=decision), version)

    async def abort_canary(
        self,
        version: str | None = None,
        reasons: list[str] | None = None,
        decision: dict[str, Any] | None = None,
        by: str = "operator",
        code: str | None = None,
    ) -> str:
        return _abort(await self._abort_call(version, reasons or [], decision, by, code), version)

    async def pin(self, version: str, by: str = "pin") -> Promotion:
        return _promotion(await self._promote_call(version, "pin", by, None), version)

    async def unpin(self) -> str | None:
        pinned = await self.redis.getdel(self.keys.adapter_pin)
        return _text(pinned) if pinned else None

    async def rollback(self, by: str = "rollback") -> Promotion:
        return _rollback(await self._rollback_call(by))

    async def reject(
        self, version: str, reasons: list[str], code: str, by: str = "operator", fence: Fence | None = None
    ) -> str:
        return _rejection(await self._reject_call(version, reasons, code, by, fence), version)

    async def get(self, version: str) -> AdapterRecord | None:
        return parse_record(await self.redis.hgetall(self.keys.adapter(version)))

    async def view(self) -> RegistryView:
        return _parse_view(await self._read_call("all"))

    async def serving(self) -> RegistryView:
        return _parse_view(await self._read_call("serving"))
