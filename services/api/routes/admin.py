"""Admin routes (bearer token from settings): engine state and adapter slots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from services.api import auth
from services.api.deps import EngineDep
from services.api.errors import ApiError
from services.engine.engine import AdapterError, UnknownModel


async def require_admin(request: Request) -> None:
    """The admin token (FEEDLOOP_API__ADMIN_TOKEN) or an admin API key (services/api/auth.py)."""
    await auth.require_admin(request)


router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class LoadAdapter(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    path: str = Field(min_length=1)


class SetAlias(BaseModel):
    target: str | None


@router.get("/engine")
async def engine_state(engine: EngineDep) -> dict[str, Any]:
    return {
        "model": engine.model_path,
        "base": engine.base_name,
        "running_requests": engine.num_unfinished_requests(),
        "adapters": [
            {"name": a.name, "path": a.path, "lora_id": a.lora_id, "in_flight": engine.in_flight(a.name)}
            for a in engine.list_adapters()
        ],
        "aliases": engine.aliases(),
    }


@router.post("/engine/adapters", status_code=201)
async def load_adapter(body: LoadAdapter, engine: EngineDep) -> dict[str, Any]:
    """Load an adapter into the engine's slots (no validation, no alias switch: the registry does that)."""
    if not Path(body.path, "adapter_config.json").is_file():
        # the folder the body names is not there (on this replica): a reference to nothing, like an unknown name
        raise ApiError(404, f"No PEFT adapter at '{body.path}'.", param="path", code="adapter_not_found")
    try:
        adapter = await engine.add_adapter(body.name, body.path)
    except AdapterError as e:
        raise ApiError(409, str(e), code="adapter_conflict") from None
    except (RuntimeError, ValueError) as e:  # the engine could not load it (e.g. a broken adapter)
        raise ApiError(409, f"The engine could not load the adapter: {e}", code="adapter_load_failed") from None
    return {"name": adapter.name, "path": adapter.path, "lora_id": adapter.lora_id}


@router.delete("/engine/adapters/{name}")
async def unload_adapter(name: str, engine: EngineDep) -> dict[str, Any]:
    try:
        await engine.remove_adapter(name)
    except UnknownModel:
        raise ApiError(404, f"No adapter named '{name}' is loaded.", code="adapter_not_found") from None
    except AdapterError as e:
        raise ApiError(409, str(e), code="adapter_in_use") from None
    return {"name": name, "status": "unloaded"}


@router.put("/engine/aliases/{alias}")
async def set_alias(alias: str, body: SetAlias, engine: EngineDep) -> dict[str, Any]:
    try:
        engine.set_alias(alias, body.target)
    except UnknownModel:
        raise ApiError(404, f"No adapter named '{body.target}' is loaded.", code="adapter_not_found") from None
    except AdapterError as e:
        raise ApiError(409, str(e), code="alias_conflict") from None
    return {"alias": alias, "target": body.target}
