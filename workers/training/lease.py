"""The training lease: one run at a time holds it, with a fencing token, renewed by a heartbeat thread.

The lease is one Redis key (Keys.training_lease) whose value is ``"{token}:{run_id}"``; the token comes from
an INCR counter (Keys.fencing_counter), so every holder ever gets a larger token than the one before it. It
expires ``training.lease_ttl_s`` after its last renewal: a worker that is SIGKILLed or loses the network
stops renewing, and the lease disappears on its own.

A run's writes are *fenced*: each is a Lua script that first checks that the lease still holds this run's
value, and refuses the write otherwise (:class:`LeaseLost`). A holder that was paused past its TTL (a GC
pause, a frozen VM, a partition) and wakes up after another run took the lease can therefore not
overwrite anything: its token is stale. The adapter registry accepts the same ``fence=(key, value)``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from services.core.keys import Keys

log = logging.getLogger(__name__)

# KEYS: lease, fencing counter, run hash. ARGV: run id, ttl ms, now, worker.
# Takes the lease and moves the run from queued to running in one step (the trigger's stale-run check reads
# both, so it never sees a running run without its lease or a lease without its running run).
_ACQUIRE = """
local status = redis.call('HGET', KEYS[3], 'status')
if status ~= 'queued' then return {'not_queued', status or ''} end
local holder = redis.call('GET', KEYS[1])
if holder then return {'busy', holder} end
local token = redis.call('INCR', KEYS[2])
local value = token .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
redis.call('HSET', KEYS[3], 'status', 'running', 'started_at', ARGV[3], 'token', token, 'worker', ARGV[4])
return {'acquired', value}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, hash. ARGV: lease value, field/value pairs.
_FENCED_HSET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[2], unpack(fields))
return 1
"""

# KEYS: lease, list. ARGV: lease value, item.
_FENCED_RPUSH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[2])
return 1
"""


class LeaseLost(RuntimeError):
    """The lease no longer holds this run's token: the write was refused and the run must stop."""


class LeaseBusy(RuntimeError):
    pass


@dataclass(frozen=True)
class Lease:
    key: str
    run_id: str
    value: str  # "{token}:{run_id}"

    @property
    def token(self) -> int:
        return int(self.value.split(":", 1)[0])

    @property
    def fence(self) -> tuple[str, str]:
        """What the registry's fenced writes check."""
        return (self.key, self.value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LeaseClient:
    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._hset = redis.register_script(_FENCED_HSET)
        self._rpush = redis.register_script(_FENCED_RPUSH)

    def acquire_for_run(self, run_id: str, worker: str) -> Lease:
        """Take the lease for a queued run and mark it running. Raises LeaseBusy, or ValueError with the
        run's status when it is not queued (a redelivered task of a run that started or finished)."""
        outcome, detail = (
            _text(v)
            for v in self._acquire(
                keys=[self.keys.training_lease, self.keys.fencing_counter, self.keys.run(run_id)],
                args=[run_id, self.ttl_ms, repr(time.time()), worker],
            )
        )
        if outcome == "busy":
            raise LeaseBusy(f"the training lease is held by {detail}")
        if outcome == "not_queued":
            raise ValueError(detail)
        return Lease(self.keys.training_lease, run_id, detail)

    def holder(self) -> str | None:
        value = self.redis.get(self.keys.training_lease)
        return _text(value) if value is not None else None

    def renew(self, lease: Lease) -> bool:
        return bool(self._renew(keys=[lease.key], args=[lease.value, self.ttl_ms]))

    def release(self, lease: Lease) -> bool:
        return bool(self._release(keys=[lease.key], args=[lease.value]))

    def hset(self, lease: Lease, key: str, mapping: dict[str, str]) -> None:
        flat = [item for pair in mapping.items() for item in pair]
        if not self._hset(keys=[lease.key, key], args=[lease.value, *flat]):
            raise LeaseLost(f"{lease.run_id} (token {lease.token}) lost the training lease; write refused")

    def rpush(self, lease: Lease, key: str, item: str) -> None:
        if not self._rpush(keys=[lease.key, key], args=[lease.value, item]):
            raise LeaseLost(f"{lease.run_id} (token {lease.token}) lost the training lease; write refused")


class Heartbeat:
    """Renews a lease every ttl/3 in a daemon thread. ``lost`` is set once a renewal is refused (another
    holder has it) or no renewal succeeded for a whole TTL (Redis unreachable): the run must then stop."""

    def __init__(self, client: LeaseClient, lease: Lease) -> None:
        self.client = client
        self.lease = lease
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"{self.lease.run_id} lost the training lease")

    def _run(self) -> None:
        period = self.client.ttl_ms / 3000
        last_ok = time.monotonic()
        while not self._stop.wait(period):
            try:
                if not self.client.renew(self.lease):
                    log.error("training lease of %s was taken over; stopping the run", self.lease.run_id)
                    self.lost.set()
                    return
                last_ok = time.monotonic()
            except RedisError as error:
                log.warning("lease renewal of %s failed: %s", self.lease.run_id, error)
                if time.monotonic() - last_ok > self.client.ttl_ms / 1000:
                    self.lost.set()
                    return
