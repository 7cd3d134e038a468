"""The FastAPI app factory and its lifespan (engine, Redis, interaction log)."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import ORJSONResponse

from services.adapters.hotswap import Swapper
from services.api.body_limit import BodySizeLimit
from services.api.errors import install_error_handlers
from services.api.observe import RequestMetrics
from services.api.observe import router as metrics_router
from services.api.routes import adapters, admin, chat, feedback, health, widget
from services.core import metrics
from services.core.config import Settings, get_settings
from services.core.keys import Keys
from services.core.redis import check_redis_safety, connect
from services.engine.engine import Engine
from services.feedback.interactions import InteractionLog
from services.feedback.votes import FeedbackStore, Limits

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = connect(settings.redis_url)
        await check_redis_safety(redis)
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
        )
        interactions.start()
        fb = settings.feedback
        app.state.feedback_store = FeedbackStore(
            redis,
            Keys(settings.redis_prefix),
            settings.interactions.ttl_s,
            Limits(fb.rate_per_user, fb.burst_per_user, fb.rate_per_ip, fb.burst_per_ip),
            fb.stream_maxlen,
        )
        metrics.engine_collector(eng.stats)
        app.state.settings = settings
        app.state.engine = eng
        app.state.redis = redis
        app.state.keys = Keys(settings.redis_prefix)
        app.state.interactions = interactions
        # Follows the registry's active adapter; /readyz waits for its first reconcile.
        app.state.swapper = swapper = Swapper(eng, redis, Keys(settings.redis_prefix), settings)
        await swapper.start()
        # The engine, torch and the tokenizer leave millions of long-lived objects; keep them out of the
        # collector's scans so that its pauses do not land in request latency.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            await swapper.stop()
            metrics.unregister_engine_collector()
            await interactions.close()
            if own_engine:
                eng.shutdown()
            await app.state.feedback_store.aclose()
            await redis.aclose()

    app = FastAPI(title="feedloop", version="0.1.0", lifespan=lifespan, default_response_class=ORJSONResponse)
    install_error_handlers(app)
    # Starlette matches routes in order: the hot routes first.
    app.include_router(chat.router)
    app.include_router(feedback.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(adapters.router)
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
