"""Hot-swap in a serving replica: make the engine's public alias follow the registry's active version.

Every API process runs one :class:`Swapper`. It listens on the promotions channel and, in any case,
reconciles with the registry every ``gate.reconcile_interval_s`` (a replica that missed a message, lost
its Redis connection or just started converges on the next pass). The registry, not the message, is the
truth: a message only wakes the reconcile loop.

Switching to version V (never reloading an old name: one immutable engine name per version)::

    validate manifest (base model, rank, target modules, sha256)  ->  engine.add_adapter(V, path)
    -> greedy warm-up request on V (must finish)  ->  engine.set_alias(alias, V)
    -> unload every version except the active and the previous one, each after its requests drained

A request resolves the alias once, when it starts, so running requests finish on the version they
started with; the previous version stays loaded, so a rollback is only an alias switch. A version whose
*content* fails a check (manifest, base model, rank, modules, sha256) is marked rejected in the registry
with its reason (the registry then reverts to the version replicas still serve) and is never served: the
alias stays where it was; an operator may re-validate it (`feedloop adapters revalidate V`). A *local*
failure (an I/O error, a folder not mounted here, a load error, a timeout under load) says nothing about
the version: this replica retries it with back-off (5 s doubling to ``gate.local_retry_max_s``), counts it
in ``feedloop_adapter_swaps_total{outcome="failure"}`` and leaves the registry alone. The replica reports
ready (/readyz) only once the alias serves what the registry says (first reconcile done).

A running **canary** (registry status ``canary``) is loaded and warmed up on every replica too, beside the
active one; only then does :attr:`Swapper.canary` name it, and the routes send its share of users to it
(services/adapters/canary.py). A replica that cannot load or warm it up ends the canary at once (rejected
when its content failed, retired for a local failure: a canary that does not run everywhere cannot be
measured), and counts it in ``feedloop_canary_decisions_total{outcome="replica_failure"}``.

The swapper acts when the registry's active version differs from the one it last applied, not from
whatever the alias points at: a manual switch through ``PUT /admin/engine/aliases/{alias}`` (a debugging
tool) holds until the registry's active version changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from services.adapters.manifest import (
    AdapterRejected,
    base_model_fingerprint,
    base_model_id,
    validate_adapter,
)
from services.adapters.registry import AdapterRecord, AsyncAdapterRegistry, RegistryError
from services.core import metrics
from services.core.config import Settings
from services.core.keys import Keys
from services.core.tasks import cancel_and_wait
from services.engine.engine import AdapterError, Engine, UnknownModel

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from services.core.redis_watch import RedisWatch

log = logging.getLogger(__name__)

WARMUP_MESSAGES = [{"role": "user", "content": "Hello"}]
WARMUP_MAX_TOKENS = 2  # prefill and one decode step on the adapter
# When every LoRA slot is taken, how long a swap waits for old versions to drain before loading anyway
# (vLLM keeps 2 x max_loras adapters in its CPU cache and evicts the least recently used beyond that).
ROOM_WAIT_S = 10.0
ROLLBACK_SOURCES = ("rollback", "revert")
_UNSET = object()


class SwapFailed(Exception):
    """outcome "rejected": the adapter's content failed a check (every replica would fail it): the version is
    rejected in the registry. outcome "failure": this replica's local trouble (I/O, a folder not mounted, a
    load error, a warm-up timeout under load): the replica retries with back-off and the registry is left alone.
    """

    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.outcome = outcome  # metrics label: "rejected" (content) or "failure" (local: load, I/O, warm-up)
        self.code = code
        self.message = message

    @property
    def local(self) -> bool:
        return self.outcome != "rejected"


LOCAL_RETRY_FIRST_S = 5.0


class Swapper:
    def __init__(
        self,
        engine: Engine,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        replica: str | None = None,
        *,
        watch: RedisWatch | None = None,
    ):
        self.engine = engine
        self.watch = watch  # tells a Redis that lost its data from a registry emptied on purpose
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.alias = settings.engine.alias
        self.registry = AsyncAdapterRegistry(redis, keys, alias=self.alias, reserved=(engine.base_name,))
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self.ready = False
        self._served_model = base_model_id(engine.model_path)
        self._served_sha256: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._managed: set[str] = set()  # versions this swapper loaded (it unloads only those)
        self._unloading: dict[str, asyncio.Task[None]] = {}
        # versions whose content failed here (rejected in the registry) -> when; retried only after an operator
        # revalidates the version (its record's revalidated_at is newer)
        self._failed: dict[str, float] = {}
        # versions that failed here for a local reason -> (attempts, monotonic time of the next try, error)
        self._retrying: dict[str, tuple[int, float, str]] = {}
        # What this swapper last made the alias serve (None: the base model). The swapper acts when the
        # registry's active version differs from it, so a manual switch through /admin/engine/aliases (a
        # debugging tool) holds until the registry changes; a replica that missed an event still converges.
        self._applied: str | object | None = _UNSET
        # Redis data losses (RedisWatch) known when the applied version was switched to; a later one means an
        # empty registry is a lost one, and the replica keeps serving what it has (kept_after_data_loss).
        self._losses_seen = 0
        self.kept_after_data_loss = False
        # (version, share) of the running canary once it is loaded and warmed up here; None: no canary served
        self.canary: tuple[str, float] | None = None

    # ---- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._served_sha256 = await asyncio.to_thread(base_model_fingerprint, self.engine.model_path)
        self._tasks = [
            asyncio.create_task(self._reconcile_loop(), name="adapter-reconcile"),
            asyncio.create_task(self._listen(), name="adapter-promotions"),
        ]

    async def stop(self) -> None:
        await asyncio.gather(*(cancel_and_wait(task) for task in [*self._tasks, *self._unloading.values()]))
        self._tasks = []

    def wake(self) -> None:
        """Reconcile now (a promotion message arrived, or a caller knows the registry changed)."""
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
                # ready once the alias serves what the registry says (an adapter that fails here for a local
                # reason at start keeps the replica unready while it retries, rather than serving the base)
                if self._applied is not _UNSET:
                    self.ready = True
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("adapter reconcile failed; retrying")
            interval = self.settings.gate.reconcile_interval_s if self.ready else 1.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)

    async def _listen(self) -> None:
        channel = self.keys.promotions_channel
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                self.wake()  # (re)subscribed: whatever was published meanwhile is in the registry
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        log.info("promotion message: %s", message.get("data"))
                        self.wake()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("promotions subscription lost (%s); resubscribing", error)
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    # ---- reconcile --------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Bring the engine in line with the registry's active and previous versions."""
        async with self._lock:
            view = await self.registry.serving()
            active, previous = view.get(view.active), view.get(view.previous)
            if active is None:
                if isinstance(self._applied, str) and await self._registry_lost():
                    pass  # Redis lost the registry: keep the adapter rather than fall back to base silently
                elif self._applied is not None:
                    if self._applied is not _UNSET:
                        log.info("registry has no active adapter: %s serves the base model", self.alias)
                        metrics.ADAPTER_ROLLBACKS.inc()
                    self.engine.set_alias(self.alias, None)
                    self._applied = None
                    metrics.set_active_adapter(None, None)
            elif active.version != self._applied and self._servable(active):
                await self._switch(active)
            if previous is not None and self._servable(previous) and not self._loaded(previous.version):
                await self._preload(previous)
            await self._follow_canary(view.get(view.canary))
            applied = self._applied if isinstance(self._applied, str) else None
            keep = {v for v in (self.engine.aliases().get(self.alias), applied, view.previous, view.canary) if v}
            for version in sorted(self._managed - keep - set(self._unloading)):
                self._unloading[version] = asyncio.create_task(self._unload(version), name=f"unload-{version}")

    async def _registry_lost(self) -> bool:
        """The registry has no active version because Redis came back without its data (not because an
        operator or a rejection emptied it): the epoch key changed since the applied version was switched to."""
        if self.kept_after_data_loss:
            return True
        if self.watch is None:
            return False
        await self.watch.check()
        if self.watch.data_losses <= self._losses_seen:
            return False
        self.kept_after_data_loss = True
        log.error(
            "the adapter registry is empty after a Redis data loss: %s keeps serving %s (alert "
            "FeedloopRedisDataLost). Promote a version again to resume following the registry.",
            self.alias,
            self._applied,
        )
        return True

    def _servable(self, record: AdapterRecord) -> bool:
        failed_at = self._failed.get(record.version)
        if failed_at is not None and record.revalidated_at is not None and record.revalidated_at > failed_at:
            del self._failed[record.version]  # an operator revalidated it: try again
            failed_at = None
        retry = self._retrying.get(record.version)
        if retry is not None and time.monotonic() < retry[1]:
            return False  # backing off after a local failure
        return record.status != "rejected" and failed_at is None

    def _loaded(self, version: str) -> bool:
        """Loaded, validated and warmed up by this swapper."""
        return version in self._managed and any(a.name == version for a in self.engine.list_adapters())

    async def _switch(self, record: AdapterRecord) -> None:
        started = time.perf_counter()
        try:
            if not self._loaded(record.version):
                await self._load(record)
            self.engine.set_alias(self.alias, record.version)
        except SwapFailed as failure:
            await self._reject(record, failure)
            return
        self._retrying.pop(record.version, None)
        elapsed = time.perf_counter() - started
        metrics.ADAPTER_SWAP_DURATION.observe(elapsed)
        metrics.ADAPTER_SWAPS.labels("success").inc()
        if record.activated_by in ROLLBACK_SOURCES:
            metrics.ADAPTER_ROLLBACKS.inc()
        self._applied = record.version
        self._losses_seen = self.watch.data_losses if self.watch is not None else 0
        self.kept_after_data_loss = False
        metrics.set_active_adapter(record.version, record.promoted_at)
        log.info("%s -> %s in %.3fs (%s)", self.alias, record.version, elapsed, record.activated_by)

    async def _preload(self, record: AdapterRecord) -> None:
        """Load the previous version (a replica that started after it was demoted) for instant rollback."""
        try:
            await self._load(record)
            self._retrying.pop(record.version, None)
        except SwapFailed as failure:
            await self._reject(record, failure)

    async def _follow_canary(self, record: AdapterRecord | None) -> None:
        """Load and warm up the registry's canary (routes see it only then); end it when it fails here."""
        if record is None or record.status != "canary":
            if self.canary is not None:
                log.info("canary %s ended: no requests are routed to it", self.canary[0])
            self.canary = None
            metrics.CANARY_SHARE.set(0)
            return
        if not self._loaded(record.version):
            self.canary = None
            try:
                await self._load(record)
            except SwapFailed as failure:
                await self._canary_failed(record, failure)
                return
            log.info("canary %s loaded: %.0f%% of users routed to it", record.version, 100 * (record.canary_share or 0))
        self.canary = (record.version, record.canary_share or 0.0)
        metrics.CANARY_SHARE.set(self.canary[1])

    async def _canary_failed(self, record: AdapterRecord, failure: SwapFailed) -> None:
        metrics.ADAPTER_SWAPS.labels(failure.outcome).inc()
        metrics.CANARY_DECISIONS.labels("replica_failure").inc()
        reason = f"replica {self.replica} could not serve the canary: {failure}"
        log.error("%s; ending the canary", reason)
        try:
            await self.registry.abort_canary(
                record.version,
                [reason],
                {"outcome": "rollback", "hard_failure": "replica", "code": failure.code},
                by=f"replica {self.replica}",
                code=None if failure.local else failure.code,
            )
        except RegistryError as error:  # ended meanwhile
            log.info("canary %s: %s", record.version, error)
        if not failure.local:
            self._failed[record.version] = time.time()
        self.wake()

    async def _reject(self, record: AdapterRecord, failure: SwapFailed) -> None:
        metrics.ADAPTER_SWAPS.labels(failure.outcome).inc()
        if failure.local:  # this replica's trouble: retry later, leave the version alone everywhere else
            attempts = self._retrying.get(record.version, (0, 0.0, ""))[0] + 1
            delay = min(LOCAL_RETRY_FIRST_S * 2 ** (attempts - 1), self.settings.gate.local_retry_max_s)
            self._retrying[record.version] = (attempts, time.monotonic() + delay, str(failure))
            log.warning(
                "adapter %s failed on this replica (attempt %d): %s; retrying in %.0fs (not rejected: a local failure)",
                record.version,
                attempts,
                failure,
                delay,
            )
            return
        self._failed[record.version] = time.time()
        log.error("adapter %s not served: %s", record.version, failure)
        try:
            outcome = await self.registry.reject(
                record.version, [str(failure)], failure.code, by=f"replica {self.replica}"
            )
            log.info("registry: %s %s", record.version, outcome)
        except RegistryError as error:
            log.warning("could not mark %s rejected: %s", record.version, error)
        self.wake()  # the registry may have reverted the active version

    # ---- loading and unloading --------------------------------------------------------------------
    async def _load(self, record: AdapterRecord) -> None:
        version = record.version
        if version in self._unloading:  # an older copy of this version is still draining out
            await asyncio.shield(self._unloading[version])
        await self._make_room()
        timeout = self.settings.gate.warmup_timeout_s
        try:
            # a folder that is not there at all is this replica's storage (a volume not mounted), not content
            if not await asyncio.wait_for(asyncio.to_thread(os.path.isdir, record.path), timeout):
                raise SwapFailed("failure", "not_found_here", f"{record.path} is not a folder on this replica")
            await asyncio.wait_for(
                asyncio.to_thread(
                    validate_adapter,
                    record.path,
                    self._served_model,
                    self.settings.engine.max_lora_rank,
                    self.settings.gate.supported_target_modules,
                    served_base_sha256=self._served_sha256,
                    expected_version=version,
                ),
                timeout,
            )
        except AdapterRejected as rejection:
            raise SwapFailed("rejected", rejection.reason, rejection.message) from None
        except (OSError, TimeoutError) as error:  # I/O error or slow storage: local
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            raise SwapFailed("failure", "io_error", f"reading {record.path} failed: {reason}") from None
        if not any(a.name == version for a in self.engine.list_adapters()):  # else loaded by hand: adopt it
            try:
                await self.engine.add_adapter(version, record.path)
            except Exception as error:  # AdapterError, or the engine core failing to read the files
                raise SwapFailed("failure", "load_failed", f"{type(error).__name__}: {error}") from None
        self._managed.add(version)
        try:
            await asyncio.wait_for(self._warm_up(version), self.settings.gate.warmup_timeout_s)
        except Exception as error:
            await self._discard(version)
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            raise SwapFailed("failure", "warmup_failed", f"warm-up request on {version} failed: {reason}") from None

    async def _warm_up(self, version: str) -> None:
        """One tiny greedy request on the version: when it finishes, the engine has loaded and run it."""
        from vllm import SamplingParams

        target = self.engine.resolve(version)
        params = SamplingParams(temperature=0.0, max_tokens=WARMUP_MAX_TOKENS)
        finished = False
        request_id = f"warmup-{version}-{uuid.uuid4().hex[:8]}"
        async for output in self.engine.generate(self.engine.render(WARMUP_MESSAGES), params, request_id, target):
            finished = output.finished
        if not finished:
            raise RuntimeError("the warm-up request did not finish")

    async def _discard(self, version: str) -> None:
        with contextlib.suppress(UnknownModel, AdapterError, TimeoutError):
            await self.engine.remove_adapter(version, drain_timeout_s=5.0)
        self._managed.discard(version)

    async def _make_room(self) -> None:
        pending = list(self._unloading.values())
        in_engine = len(self.engine.list_adapters()) + len(pending)
        if pending and in_engine >= self.settings.engine.max_loras:
            await asyncio.wait([asyncio.shield(t) for t in pending], timeout=ROOM_WAIT_S)

    async def _unload(self, version: str) -> None:
        try:
            await self.engine.remove_adapter(version, drain_timeout_s=self.settings.gate.drain_timeout_s)
            self._managed.discard(version)
            log.info("unloaded %s", version)
        except UnknownModel:
            self._managed.discard(version)
        except AdapterError:
            pass  # the alias points at it again (promoted back meanwhile): keep it
        except TimeoutError:
            # Still referenced by a request that outlived drain_timeout_s: the name is gone, vLLM's LRU cache
            # drops the weights when it needs the slot.
            self._managed.discard(version)
            log.warning("%s did not drain in %.0fs", version, self.settings.gate.drain_timeout_s)
        finally:
            self._unloading.pop(version, None)

    def state(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "alias": self.alias,
            "serving": self.engine.aliases().get(self.alias),
            "loaded": sorted(self._managed),
            "unloading": sorted(self._unloading),
            "failed_here": sorted(self._failed),
            "retrying_here": {v: {"attempts": a, "error": e} for v, (a, _, e) in sorted(self._retrying.items())},
            "kept_after_data_loss": self.kept_after_data_loss,
            "canary": {"version": self.canary[0], "share": self.canary[1]} if self.canary else None,
        }
