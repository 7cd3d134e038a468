"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import ORJSONResponse

from services.api.auth import authenticate
from services.api.deps import EngineDep

router = APIRouter()


@router.get("/healthz")
async def healthz(engine: EngineDep) -> Any:
    """Liveness: the engine core is running. A dead core (killed, crashed) fails it, so the orchestrator
    restarts the replica instead of leaving it live and unready forever."""
    if not engine.alive:
        return ORJSONResponse({"status": "engine core dead"}, status_code=503)
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, engine: EngineDep) -> Any:
    """Readiness: this replica can serve chat (the engine runs, and the registry's active adapter is loaded
    and serves the public alias: first reconcile done). Redis is reported in the body, never a reason to stop
    serving chat, which needs no Redis."""
    swapper = getattr(request.app.state, "swapper", None)
    watch = getattr(request.app.state, "redis_watch", None)
    checks = {"engine": engine.ready, "adapter": swapper is None or swapper.ready}
    ok = all(checks.values())
    body = {"status": "ready" if ok else "not ready", "checks": checks, "redis": watch.state() if watch else None}
    return ORJSONResponse(body, status_code=200 if ok else 503)


@router.get("/v1/models", dependencies=[Depends(authenticate)])
async def list_models(engine: EngineDep) -> dict[str, Any]:
    """Public model names only: "root" is the public base model name, never a path on the server."""
    data = [
        {
            "id": engine.base_name,
            "object": "model",
            "created": 0,
            "owned_by": "feedloop",
            "root": engine.base_name,
            "parent": None,
        }
    ]
    for alias, target in engine.aliases().items():
        data.append(
            {
                "id": alias,
                "object": "model",
                "created": 0,
                "owned_by": "feedloop",
                "root": engine.base_name,
                "parent": target or engine.base_name,
            }
        )
    for adapter in engine.list_adapters():
        data.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": 0,
                "owned_by": "feedloop",
                "root": engine.base_name,
                "parent": engine.base_name,
            }
        )
    return {"object": "list", "data": data}
