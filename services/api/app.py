"""The FastAPI app factory and its lifespan (engine, Redis, interaction log)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import ORJSONResponse

from services.adapters.hotswap import Swapper
from services.api.auth import KeyCache
from services.api.body_limit import BodySizeLimit
from services.api.errors import error_responses, install_error_handlers
from services.api.observe import RequestMetrics
from services.api.observe import router as metrics_router
from services.api.routes import adapters, admin, chat, completions, feedback, health, widget
from services.core import metrics
from services.core.config import Settings, get_settings
from services.core.keys import Keys
from services.core.redis import check_redis_safety, connect
from services.core.redis_watch import RedisWatch
from services.engine.engine import Engine
from services.feedback.interactions import InteractionLog
from services.feedback.votes import FeedbackStore, Limits

log = logging.getLogger(__name__)


def _register_bootstrap_key(settings: Settings) -> None:
    """The deployment's first app key (the chart's Secret), registered hashed if it is not yet."""
    from services.core.apikeys import ApiKeyStore
    from services.core.redis import connect_sync

    client = connect_sync(settings.redis_url, settings=settings)
    try:
        key = ApiKeyStore(client, Keys(settings.redis_prefix)).add(
            settings.api.bootstrap_app_key, settings.api.bootstrap_app
        )
        log.info("API key %s of app %s is registered (FEEDLOOP_API__BOOTSTRAP_APP_KEY)", key.id, key.app)
    finally:
        client.close()


# a generation route answers JSON, or Server-Sent Events with "stream": true
_STREAM_OR_JSON = {
    "description": "The completion (JSON), or its chunks as Server-Sent Events when streaming",
    "content": {
        "application/json": {},
        # before OpenAPI 3.2 the schema of an event stream describes one event: its data is a JSON chunk or [DONE]
        "text/event-stream": {
            "schema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
        },
    },
}


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url, settings=settings)
        await check_redis_safety(redis)
        # Redis reachability and data loss (the epoch key): /readyz's body, metrics, and the swapper asks it
        # before following an empty registry back to the base model.
        redis_watch = RedisWatch(redis, Keys(settings.redis_prefix), settings.redis_check_interval_s)
        await redis_watch.check()
        redis_watch.start()
        own_engine = engine is None
        eng = engine or Engine(settings)
        if not eng.ready:
            log.info("starting the engine on %s", eng.model_path)
            eng.start()
        interactions = InteractionLog(
            redis,
            Keys(settings.redis_prefix),
            settings.interactions.ttl_s,
            settings.interactions.flush_interval_ms / 1000,
            settings.interactions.batch_size,
            settings.interactions.max_buffered,
        )
        interactions.start()
        fb = settings.feedback
        app.state.feedback_store = FeedbackStore(
            redis,
            Keys(settings.redis_prefix),
            settings.interactions.ttl_s,
            Limits(
                fb.rate_per_user, fb.burst_per_user, fb.rate_per_ip, fb.burst_per_ip, fb.rate_per_app, fb.burst_per_app
            ),
            fb.stream_maxlen,
        )
        metrics.engine_collector(eng.stats)
        app.state.settings = settings
        app.state.engine = eng
        app.state.redis = redis
        app.state.keys = Keys(settings.redis_prefix)
        app.state.interactions = interactions
        app.state.redis_watch = redis_watch
        app.state.key_cache = KeyCache(redis, Keys(settings.redis_prefix), settings.api.key_cache_s)
        if settings.api.bootstrap_app_key:
            _register_bootstrap_key(settings)
        # Follows the registry's active adapter; /readyz waits for its first reconcile.
        app.state.swapper = swapper = Swapper(eng, redis, Keys(settings.redis_prefix), settings, watch=redis_watch)
        await swapper.start()
        # The engine, torch and the tokenizer leave millions of long-lived objects; keep them out of the
        # collector's scans so that its pauses do not land in request latency.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await swapper.stop()
            await redis_watch.stop()
            metrics.unregister_engine_collector()
            await interactions.close()
            if own_engine:
                eng.shutdown()
            await app.state.feedback_store.aclose()
            await redis.aclose()

    app = FastAPI(title="feedloop", version="0.1.0", lifespan=lifespan, default_response_class=ORJSONResponse)
    install_error_handlers(app)
    # Starlette matches routes in order: the hot routes first.
    # Every error status a route can answer is documented with OpenAI's error body (the schema is the contract).
    generation = {**error_responses(400, 401, 404, 413, 422, 429, 503), 200: _STREAM_OR_JSON}
    app.include_router(chat.router, responses=generation)
    app.include_router(completions.router, responses=generation)
    app.include_router(feedback.router, responses=error_responses(400, 403, 404, 410, 413, 422, 429, 503))
    probes: dict[int | str, dict[str, Any]] = {503: {"description": "Not alive, or not ready (see the body)"}}
    app.include_router(health.router, responses={**error_responses(401), **probes})
    app.include_router(admin.router, responses=error_responses(400, 401, 404, 409, 413, 422, 503))
    app.include_router(adapters.router, responses=error_responses(400, 401, 404, 409, 413, 422, 503))
    app.include_router(metrics_router)
    widget.mount(app, settings.api.demo_page)
    if settings.api.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o for o in settings.api.cors_origins if o != "*"],
            allow_credentials=False,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["Content-Type", "Authorization"],
            max_age=600,
        )
    app.add_middleware(BodySizeLimit, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(RequestMetrics)
    return app
