"""Liveness, readiness and the model list."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse

from services.api.deps import EngineDep, RedisDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, engine: EngineDep, redis: RedisDep) -> Any:
    swapper = getattr(request.app.state, "swapper", None)
    # "adapter": the registry's active adapter is loaded and serves the public alias (first reconcile done).
    checks = {"engine": engine.ready, "adapter": swapper is None or swapper.ready}
    try:
        checks["redis"] = bool(await redis.ping())
    except Exception:
        checks["redis"] = False
    ok = all(checks.values())
    return ORJSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def list_models(engine: EngineDep) -> dict[str, Any]:
    data = [
        {
            "id": engine.base_name,
            "object": "model",
            "created": 0,
            "owned_by": "feedloop",
            "root": engine.model_path,
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
                "root": engine.model_path,
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
                "root": adapter.path,
                "parent": engine.base_name,
            }
        )
    return {"object": "list", "data": data}
