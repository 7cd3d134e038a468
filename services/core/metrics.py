"""Every Prometheus metric feedloop exports, defined once, in the default registry.

One module on purpose (over 400 lines): the dashboard, the alert rules and tests/unit/core/test_metrics_names.py
read metric names from one place, and the bounded-label conventions below hold for all of them.

Conventions: base units (seconds, bytes), ``_total`` on counters, and label values from small fixed sets.
No label ever holds a user id, an IP, a completion id or a free-form string. The two labels whose values
are not a literal set are bounded by the system:

* ``model`` (API): the public model name a request asked for. Unknown names are refused with 404 *before*
  anything is counted, so the values are ``feedloop``, ``feedloop-base`` and the live adapter versions.
* ``adapter`` / ``version``: an adapter version name (``feedloop-v3``) or ``base``. New values appear
  only when training promotes a version (a few per day at most), and the registry keeps a small number of
  live versions, so a process sees a handful over its life. Use :func:`adapter_label` to turn ``None``
  into ``base``.

Where the numbers come from
---------------------------
* API process: HTTP, streaming, feedback, interaction writes, adapter swaps, and the engine. vLLM's own
  ``vllm:*`` metrics (``vllm:kv_cache_usage_perc``, ``vllm:num_requests_running``,
  ``vllm:num_requests_waiting``, ``vllm:time_to_first_token_seconds``, ...) land in the same default
  registry without any extra wiring: ``AsyncLLM`` with stats on (``AsyncEngineArgs(disable_log_stats=False)``,
  the default) always adds vLLM's ``PrometheusStatLogger``, which lives in the API process (the engine core
  subprocess ships its stats back) and registers in ``prometheus_client.REGISTRY``. Do not pass a
  ``PrometheusStatLogger`` yourself and do not set ``PROMETHEUS_MULTIPROC_DIR`` for the API. What vLLM does
  not expose cleanly (LoRA slots in use / max) comes from :func:`engine_collector`.
* Celery workers: pairs, training, gate, task runs. ``instrument_celery(app)`` counts task runs and, when
  a worker starts (signal ``worker_init``), serves the worker's metrics over HTTP on
  ``Settings.metrics_port`` (``FEEDLOOP_METRICS_PORT``, 9100) with :func:`start_worker_metrics_server`.

Celery pool choice
------------------
A metric is process memory, and Celery's default prefork pool runs tasks in child processes the metrics
server cannot see. prometheus_client's multiprocess mode would fix that, but it needs
``PROMETHEUS_MULTIPROC_DIR`` set before the first import, a wiped directory per start,
``mark_process_dead`` in every exiting child, a ``multiprocess_mode`` on every gauge (our "last value"
gauges would need ``mostrecent``) and no Info metrics. feedloop's tasks do not need it: pairing waits on
Redis and HTTP, and training runs one at a time per GPU. So workers run the **threads pool** (one
process), which keeps the default registry correct::

    celery -A workers.celery_app worker --pool threads --concurrency 4 -Q pairs      # CPU queue
    celery -A workers.celery_app worker --pool threads --concurrency 1 -Q train      # GPU queue

:func:`instrument_celery` logs a warning when a worker starts with the prefork pool. Two workers on one
host need different ``FEEDLOOP_METRICS_PORT`` values.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BASE_ADAPTER_LABEL = "base"

# Buckets, in seconds.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TRAINING_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)
SWAP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)

# The fixed label sets. Helpers coerce anything else to "other" so a metric call never raises in a request.
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
FEEDBACK_RATINGS = frozenset({"like", "dislike", "withdrawn"})
FEEDBACK_REFUSAL_REASONS = frozenset({"bad_token", "expired", "unknown", "rate_limited", "too_long", "invalid"})
UNMATCHED_ROUTE = "unmatched"

# --- API ----------------------------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "feedloop_http_requests_total",
    "HTTP requests handled, by route template (never the raw path), method and status code.",
    ["route", "method", "status"],
)
HTTP_REQUEST_DURATION = Histogram(
    "feedloop_http_request_duration_seconds",
    "Time from request start to the last byte of the response (a whole stream for streaming chats).",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "feedloop_time_to_first_token_seconds",
    "Time from a chat request's arrival to its first generated token, by public model name asked for.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
OUTPUT_TOKENS = Counter("feedloop_output_tokens_total", "Completion tokens generated, by public model name.", ["model"])
PROMPT_TOKENS = Counter("feedloop_prompt_tokens_total", "Prompt tokens processed, by public model name.", ["model"])
ACTIVE_STREAMS = Gauge("feedloop_active_streams", "Streaming chat responses open right now.")
REQUESTS_ABORTED = Counter(
    "feedloop_requests_aborted_total",
    "Generations stopped in the engine before they finished because the client left.",
)
API_ERRORS = Counter(
    "feedloop_api_errors_total",
    "Error responses sent, by OpenAI error type (the body's error.type, e.g. invalid_request_error).",
    ["type"],
)
INTERACTION_WRITES = Counter(
    "feedloop_interaction_writes_total",
    "Interaction records handed to Redis, by outcome (written, failed, dropped).",
    ["outcome"],
)
INTERACTION_WRITE_QUEUE = Gauge(
    "feedloop_interaction_write_queue", "Interaction records buffered in this process, not yet written."
)
REDIS_UP = Gauge(
    "feedloop_redis_up",
    "1 when this API replica's last Redis check was answered, 0 when it failed (chat goes on without Redis).",
)
REDIS_DATA_LOSS = Counter(
    "feedloop_redis_data_loss_total",
    "Times this replica found Redis back without its data (its epoch key changed: a restart without "
    "persistence, a failover to an empty replica).",
)

# --- Feedback -----------------------------------------------------------------------------------------

FEEDBACK_EVENTS = Counter(
    "feedloop_feedback_events_total",
    "Feedback events recorded, by rating (like, dislike, withdrawn) and adapter version that served it.",
    ["rating", "adapter"],
)
FEEDBACK_LIKES = Counter(
    "feedloop_feedback_likes_total",
    "Likes recorded, by adapter version (like-rate = likes / votes).",
    ["adapter"],
)
FEEDBACK_VOTES = Counter(
    "feedloop_feedback_votes_total", "Likes plus dislikes recorded, by adapter version.", ["adapter"]
)
FEEDBACK_VOTES_BY_APP = Counter(
    "feedloop_feedback_votes_by_app_total",
    "Likes plus dislikes recorded, by the app whose key made the completion ('(none)' without auth; apps "
    "are created by admins, so the label set is bounded).",
    ["app"],
)
DATASET_PAIRS_BY_APP = Gauge(
    "feedloop_dataset_pairs_by_app",
    "Pairs in the last dataset version by app (the top 20; the rest under '(other)', no app: '(none)').",
    ["app"],
)
FEEDBACK_REFUSED = Counter(
    "feedloop_feedback_refused_total",
    "Feedback requests refused, by reason (bad_token, expired, unknown, rate_limited, too_long, invalid).",
    ["reason"],
)

# --- Pairs --------------------------------------------------------------------------------------------

PAIRS_BUILT = Counter("feedloop_pairs_built_total", "Preference pairs stored, by pairing strategy.", ["strategy"])
PAIRS_DROPPED = Counter(
    "feedloop_pairs_dropped_total",
    "Candidate pairs dropped by quality filters, by reason (duplicate, user_cap, too_long, pii, ...).",
    ["reason"],
)
FEEDBACK_BACKLOG_PENDING = Gauge(
    "feedloop_feedback_backlog_pending",
    "Feedback stream entries delivered to the pairing group but not acknowledged (XPENDING count).",
)
FEEDBACK_BACKLOG_LAG = Gauge(
    "feedloop_feedback_backlog_lag", "Feedback stream entries not yet delivered to the pairing group (lag)."
)
FEEDBACK_DEAD_LETTERED = Counter(
    "feedloop_feedback_dead_lettered_total",
    "Feedback entries moved to the dead-letter stream (malformed, or too many deliveries).",
)
FEEDBACK_DEAD_LETTERS_TRIMMED = Counter(
    "feedloop_feedback_dead_letters_trimmed_total",
    "Oldest dead-letter entries removed to keep the dead-letter stream under pairs.dead_letter_maxlen.",
)
FEEDBACK_STREAM_TRIMMED = Counter(
    "feedloop_feedback_stream_trimmed_total",
    "Feedback stream entries removed after every consumer group had acknowledged them (XTRIM MINID).",
)
PII_MASKED = Counter(
    "feedloop_pii_masked_total", "PII spans masked in pair text, by kind (email, phone, ...).", ["kind"]
)

# --- Training and gate --------------------------------------------------------------------------------

TRAINING_RUNS = Counter(
    "feedloop_training_runs_total",
    "Training runs finished, by outcome (success, failure, skipped).",
    ["outcome"],
)
TRAINING_DURATION = Histogram(
    "feedloop_training_duration_seconds",
    "Wall time of a training run that trained.",
    buckets=TRAINING_BUCKETS,
)
TRAINING_LAST_LOSS = Gauge("feedloop_training_last_loss", "Final training loss of the last successful run.")
TRAINING_LAST_REWARD_ACCURACY = Gauge(
    "feedloop_training_last_reward_accuracy", "Held-out reward accuracy (0..1) of the last successful run."
)
TRAINING_LAST_REWARD_MARGIN = Gauge(
    "feedloop_training_last_reward_margin", "Held-out mean reward margin (chosen - rejected) of the last run."
)
GATE_RESULTS = Counter(
    "feedloop_gate_results_total",
    "Evaluation gate decisions, by result (passed, rejected) and reason (ok, low_accuracy, worse, not_better, ...).",
    ["result", "reason"],
)
DATASET_PAIRS = Gauge("feedloop_dataset_pairs", "Pairs in the last dataset version built for training.")

# --- Adapters -----------------------------------------------------------------------------------------

ACTIVE_ADAPTER_INFO = Gauge(
    "feedloop_active_adapter_info",
    "1 for the adapter version this replica serves under the public alias ('base' if none).",
    ["version"],
)
ADAPTER_SWAPS = Counter(
    "feedloop_adapter_swaps_total",
    "Hot-swap attempts on this replica, by outcome (success, failure, rejected: failed validation).",
    ["outcome"],
)
ADAPTER_SWAP_DURATION = Histogram(
    "feedloop_adapter_swap_duration_seconds",
    "Time from swap start (validate, load, warm up) to the alias switch.",
    buckets=SWAP_BUCKETS,
)
ADAPTER_ROLLBACKS = Counter("feedloop_adapter_rollbacks_total", "Rollbacks to a previous adapter version.")
ACTIVE_ADAPTER_PROMOTED_TIMESTAMP = Gauge(
    "feedloop_active_adapter_promoted_timestamp_seconds",
    "Unix time at which the active adapter version was promoted in the registry.",
)

# --- Canary (share and hard-failure counts: API replicas; votes, statistic, decisions: the worker's check) ----
CANARY_SHARE = Gauge(
    "feedloop_canary_share", "Share of users this replica routes to the running canary (0: no canary served)."
)
CANARY_ANSWERS = Counter(
    "feedloop_canary_answers_total",
    "Answers of the running canary on this replica, by outcome (ok, error, degenerate: empty or repetitive).",
    ["outcome"],
)
CANARY_VOTES = Gauge(
    "feedloop_canary_votes", "Votes counted per arm (canary, active) at the latest canary check.", ["arm"]
)
CANARY_USERS = Gauge(
    "feedloop_canary_users", "Voting users per arm (canary, active) at the latest canary check.", ["arm"]
)
CANARY_LIKE_RATE = Gauge(
    "feedloop_canary_like_rate",
    "Per-user like-rate per arm (canary, active) at the latest canary check (mean of the users' like-shares).",
    ["arm"],
)
CANARY_DIFFERENCE = Gauge(
    "feedloop_canary_difference",
    "Like-rate difference canary - active at the latest check, with its always-valid bounds (bound: estimate, "
    "lower, upper).",
    ["bound"],
)
CANARY_DECISIONS = Counter(
    "feedloop_canary_decisions_total",
    "Canary endings by outcome (promote, rollback, keep_active, hard_failure, replica_failure).",
    ["outcome"],
)

# --- Celery -------------------------------------------------------------------------------------------

TASK_RUNS = Counter(
    "feedloop_task_runs_total",
    "Celery task executions finished, by task name and outcome (success, failure, retry, other).",
    ["task", "outcome"],
)
TASK_DURATION = Histogram(
    "feedloop_task_duration_seconds",
    "Celery task execution time, by task name.",
    ["task"],
    buckets=TASK_BUCKETS,
)

# Fixed label sets start at 0, so that increase() counts their first event (a series that first appears at
# 1 has no increase). "Last value" gauges start at NaN rather than a fake 0: every process defines every
# metric, and PromQL's max() skips NaN, so max() over all targets gives the one process that set it.
TRAINING_OUTCOMES = ("success", "failure", "skipped")
SWAP_OUTCOMES = ("success", "failure", "rejected")
for _outcome in TRAINING_OUTCOMES:
    TRAINING_RUNS.labels(_outcome)
for _outcome in SWAP_OUTCOMES:
    ADAPTER_SWAPS.labels(_outcome)
for _outcome in ("written", "failed", "dropped"):
    INTERACTION_WRITES.labels(_outcome)
for _reason in FEEDBACK_REFUSAL_REASONS:
    FEEDBACK_REFUSED.labels(_reason)
for _gauge in (
    REDIS_UP,
    TRAINING_LAST_LOSS,
    TRAINING_LAST_REWARD_ACCURACY,
    TRAINING_LAST_REWARD_MARGIN,
    DATASET_PAIRS,
    FEEDBACK_BACKLOG_PENDING,
    FEEDBACK_BACKLOG_LAG,
    ACTIVE_ADAPTER_PROMOTED_TIMESTAMP,
):
    _gauge.set(math.nan)

# --- Engine (custom collector) ------------------------------------------------------------------------

ENGINE_LORA_SLOTS_USED = "feedloop_engine_lora_slots_used"
ENGINE_LORA_SLOTS_MAX = "feedloop_engine_lora_slots_max"
ENGINE_KV_CACHE_USAGE = "feedloop_engine_kv_cache_usage_ratio"
ENGINE_REQUESTS_RUNNING = "feedloop_engine_requests_running"
ENGINE_REQUESTS_WAITING = "feedloop_engine_requests_waiting"
ENGINE_METRIC_HELP = {
    ENGINE_LORA_SLOTS_USED: "LoRA adapters loaded in the engine now (added and not yet removed).",
    ENGINE_LORA_SLOTS_MAX: "Most LoRA adapters the engine keeps loaded (vLLM's max_cpu_loras).",
    ENGINE_KV_CACHE_USAGE: "KV cache in use, 0..1 (same number as vllm:kv_cache_usage_perc).",
    ENGINE_REQUESTS_RUNNING: "Requests in the engine's running batch.",
    ENGINE_REQUESTS_WAITING: "Requests queued in the engine.",
}


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine wrapper returns cheaply and synchronously (it is read at every scrape).

    The optional fields duplicate vLLM's own ``vllm:*`` gauges; leave them ``None`` when the engine runs
    with stats on, and they are simply not exported.
    """

    lora_slots_used: int
    lora_slots_max: int
    kv_cache_usage: float | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None


class EngineCollector(Collector):
    """Reads :class:`EngineStats` from the engine wrapper at scrape time."""

    def __init__(self, get_stats: Callable[[], EngineStats | None]) -> None:
        self._get_stats = get_stats

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(name, doc) for name, doc in ENGINE_METRIC_HELP.items()]

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._get_stats()
        except Exception:  # a scrape must not fail because the engine is starting or stopping
            log.debug("engine stats unavailable", exc_info=True)
            return
        if stats is None:
            return
        values = {
            ENGINE_LORA_SLOTS_USED: stats.lora_slots_used,
            ENGINE_LORA_SLOTS_MAX: stats.lora_slots_max,
            ENGINE_KV_CACHE_USAGE: stats.kv_cache_usage,
            ENGINE_REQUESTS_RUNNING: stats.requests_running,
            ENGINE_REQUESTS_WAITING: stats.requests_waiting,
        }
        for name, value in values.items():
            if value is not None:
                yield GaugeMetricFamily(name, ENGINE_METRIC_HELP[name], value=float(value))


_engine_collector: EngineCollector | None = None
_engine_collector_lock = threading.Lock()


def engine_collector(
    get_stats: Callable[[], EngineStats | None], registry: CollectorRegistry = REGISTRY
) -> EngineCollector:
    """Register the engine's numbers; replaces a previous engine collector (app restarts in tests)."""
    global _engine_collector
    with _engine_collector_lock:
        if _engine_collector is not None:
            unregister_engine_collector(registry)
        collector = EngineCollector(get_stats)
        registry.register(collector)
        _engine_collector = collector
        return collector


def unregister_engine_collector(registry: CollectorRegistry = REGISTRY) -> None:
    global _engine_collector
    if _engine_collector is not None:
        with contextlib.suppress(KeyError):
            registry.unregister(_engine_collector)
        _engine_collector = None


# --- Helpers ------------------------------------------------------------------------------------------


def adapter_label(adapter: str | None) -> str:
    """The label value for the adapter that served a completion: its version name, or ``base``."""
    return adapter or BASE_ADAPTER_LABEL


def observe_request(route: str | None, method: str, status: int, seconds: float) -> None:
    """Count one HTTP request. ``route`` is the matched route template (``/v1/feedback/{completion_id}``),
    ``None`` for a path no route matched."""
    count, duration = _request_series(route or UNMATCHED_ROUTE, method if method in HTTP_METHODS else "other", status)
    count.inc()
    duration.observe(seconds)


@functools.lru_cache(maxsize=1024)
def _request_series(route: str, method: str, status: int) -> tuple[Any, Any]:
    # labels() takes a lock and builds a key on every call; the label sets here are few and bounded.
    return HTTP_REQUESTS.labels(route, method, str(status)), HTTP_REQUEST_DURATION.labels(route, method)


def observe_tokens(model: str, prompt_tokens: int, output_tokens: int) -> None:
    PROMPT_TOKENS.labels(model).inc(prompt_tokens)
    OUTPUT_TOKENS.labels(model).inc(output_tokens)


def record_feedback(rating: str, adapter: str | None, app: str | None = None) -> None:
    """Count one recorded feedback event (call it for status "recorded", not "unchanged").

    A changed vote counts as a new vote; a withdrawal counts only in feedloop_feedback_events_total.
    """
    for counter, amount in _feedback_series(rating if rating in FEEDBACK_RATINGS else "other", adapter_label(adapter)):
        counter.inc(amount)
    if rating in ("like", "dislike"):
        FEEDBACK_VOTES_BY_APP.labels(app or "(none)").inc()


def set_dataset_pairs_by_app(counts: dict[str, int]) -> None:
    """The last dataset version's pairs per app (a bounded dict: quality.contributions)."""
    DATASET_PAIRS_BY_APP.clear()
    for app, n in counts.items():
        DATASET_PAIRS_BY_APP.labels(app).set(n)


@functools.lru_cache(maxsize=1024)
def _feedback_series(rating: str, adapter: str) -> tuple[tuple[Any, int], ...]:
    series = [(FEEDBACK_EVENTS.labels(rating, adapter), 1)]
    if rating in ("like", "dislike"):
        # The likes series is created even for a dislike: a version with only dislikes then has a like-rate
        # of 0 instead of none at all.
        series += [(FEEDBACK_VOTES.labels(adapter), 1), (FEEDBACK_LIKES.labels(adapter), int(rating == "like"))]
    return tuple(series)


def refuse_feedback(reason: str) -> None:
    FEEDBACK_REFUSED.labels(reason if reason in FEEDBACK_REFUSAL_REASONS else "other").inc()


def set_active_adapter(version: str | None, promoted_at: float | None) -> None:
    """Record the version now served under the public alias (``None``: base model).

    Only the active version's info series is kept. Its feedback counters are created at zero, so that
    ``increase()`` over them counts the first vote too.
    """
    version_value = adapter_label(version)
    ACTIVE_ADAPTER_INFO.clear()
    ACTIVE_ADAPTER_INFO.labels(version_value).set(1)
    ACTIVE_ADAPTER_PROMOTED_TIMESTAMP.set(promoted_at if promoted_at is not None else math.nan)
    FEEDBACK_VOTES.labels(version_value)
    FEEDBACK_LIKES.labels(version_value)
    for rating in ("like", "dislike"):
        FEEDBACK_EVENTS.labels(rating, version_value)


def set_feedback_backlog(lag: int, pending: int) -> None:
    """Stream-wide numbers of the pairing consumer group (XINFO GROUPS lag, XPENDING count)."""
    FEEDBACK_BACKLOG_LAG.set(lag)
    FEEDBACK_BACKLOG_PENDING.set(pending)


def record_training_run(
    outcome: str,
    seconds: float | None = None,
    loss: float | None = None,
    reward_accuracy: float | None = None,
    reward_margin: float | None = None,
    dataset_pairs: int | None = None,
) -> None:
    """Count a finished run; ``seconds`` and the last-run gauges are set only when given."""
    TRAINING_RUNS.labels(outcome).inc()
    if seconds is not None:
        TRAINING_DURATION.observe(seconds)
    for gauge, value in (
        (TRAINING_LAST_LOSS, loss),
        (TRAINING_LAST_REWARD_ACCURACY, reward_accuracy),
        (TRAINING_LAST_REWARD_MARGIN, reward_margin),
        (DATASET_PAIRS, dataset_pairs),
    ):
        if value is not None:
            gauge.set(value)


def latest_metrics(registry: CollectorRegistry = REGISTRY) -> tuple[bytes, str]:
    """The body and content type of a ``GET /metrics`` response."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


# --- Celery -------------------------------------------------------------------------------------------

_TASK_OUTCOMES = {"SUCCESS": "success", "FAILURE": "failure", "RETRY": "retry"}
_task_started: dict[str, float] = {}
_task_started_lock = threading.Lock()


def _on_task_prerun(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        with _task_started_lock:
            _task_started[task_id] = time.perf_counter()


def _on_task_postrun(task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any) -> None:
    # task_postrun fires once per execution whatever the outcome and carries the final state, so it counts
    # failures too; counting them again in task_failure would double them.
    with _task_started_lock:
        started = _task_started.pop(task_id, None) if task_id is not None else None
    name = getattr(task, "name", None) or "unknown"
    TASK_RUNS.labels(name, _TASK_OUTCOMES.get(state or "", "other")).inc()
    if started is not None:
        TASK_DURATION.labels(name).observe(time.perf_counter() - started)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    for name in list(getattr(app, "tasks", {}) or {}):
        if not name.startswith("celery."):
            for outcome in ("success", "failure"):
                TASK_RUNS.labels(name, outcome)
    pool = str(getattr(sender, "pool_cls", "") or "")
    if "prefork" in pool:
        log.warning(
            "Celery worker pool %r: task metrics are recorded in pool children that the metrics server "
            "cannot see. Start the worker with --pool threads (see services/core/metrics.py).",
            pool,
        )


def _serve_worker_metrics(**_: Any) -> None:
    from services.core.config import get_settings

    start_worker_metrics_server(get_settings().metrics_port)


def instrument_celery(app: Any, serve_metrics: bool = True) -> None:
    """Count every task run in feedloop_task_runs_total / feedloop_task_duration_seconds, and (with
    ``serve_metrics``) serve the worker's metrics on ``Settings.metrics_port`` once a worker starts.

    Safe to call in any process: only a starting Celery worker (signal ``worker_init``) opens the port, so
    the API or beat importing the app opens nothing. Idempotent. Signals are process-wide, so tasks of any
    app in the process are counted.
    """
    from celery import signals

    del app  # kept in the signature so the call sits next to the app it instruments
    signals.task_prerun.connect(_on_task_prerun, weak=False, dispatch_uid="feedloop-metrics-prerun")
    signals.task_postrun.connect(_on_task_postrun, weak=False, dispatch_uid="feedloop-metrics-postrun")
    signals.worker_init.connect(_on_worker_init, weak=False, dispatch_uid="feedloop-metrics-worker-init")
    if serve_metrics:
        signals.worker_init.connect(_serve_worker_metrics, weak=False, dispatch_uid="feedloop-metrics-worker-server")


def start_worker_metrics_server(port: int, addr: str = "0.0.0.0") -> int | None:
    """Serve this process's metrics on ``addr:port`` in a daemon thread; returns the bound port (``port=0``
    picks a free one), or ``None`` when the port is taken (logged; a worker must not die over metrics)."""
    try:
        server, _thread = start_http_server(port, addr=addr)
    except OSError as exc:
        log.error("worker metrics server not started on %s:%d: %s", addr, port, exc)
        return None
    bound = int(server.server_port)
    log.info("worker metrics on http://%s:%d/metrics", addr, bound)
    return bound
