"""Admin routes of the adapter registry: list, register, promote, rollback, pin, reject, and the running canary
(status, promote, abort).

The registry lives in Redis and is shared by every replica; a change here is published on the promotions
channel and each replica's Swapper follows it. ``?wait=true`` also reconciles this replica before
answering, so the response says what this replica now serves.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from services.adapters.hotswap import Swapper
from services.adapters.registry import (
    VERSION_PATTERN,
    AsyncAdapterRegistry,
    InvalidVersion,
    NoCanary,
    Promotion,
    RegistryError,
    UnknownVersion,
)
from services.api.errors import ApiError
from services.api.routes.admin import require_admin

router = APIRouter(prefix="/admin/adapters", dependencies=[Depends(require_admin)], tags=["adapters"])


def _swapper(request: Request) -> Swapper:
    return request.app.state.swapper


SwapperDep = Annotated[Swapper, Depends(_swapper)]


class RegisterAdapter(BaseModel):
    path: str = Field(min_length=1, description="Adapter folder (PEFT files + manifest.json) on shared storage.")
    version: str | None = Field(
        None,
        pattern=f"^({VERSION_PATTERN.pattern.strip('^$')})?$",  # the registry's rule, or empty
        description="Version name; empty: the next feedloop-v{N}.",
    )
    run_id: str | None = None
    dataset_version: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)


class RejectAdapter(BaseModel):
    reason: str = Field(min_length=1, max_length=2000)


def _refused(error: RegistryError) -> ApiError:
    status = 404 if isinstance(error, UnknownVersion) else 400 if isinstance(error, InvalidVersion) else 409
    return ApiError(status, str(error), code=error.code)


async def _answer(swapper: Swapper, result: Promotion | None, wait: bool) -> dict[str, Any]:
    if wait:
        await swapper.reconcile()
    else:
        swapper.wake()
    view = await swapper.registry.serving()
    body: dict[str, Any] = {
        "active": view.active,
        "previous": view.previous,
        "pinned": view.pinned,
        "canary": view.canary,
    }
    if result is not None:
        body.update(outcome=result.outcome, version=result.version)
    body["replica"] = swapper.state()
    return body


@router.get("")
async def list_adapters(swapper: SwapperDep) -> dict[str, Any]:
    view = await swapper.registry.view()
    return {**view.to_dict(), "replica": swapper.state()}


@router.post("", status_code=201)
async def register_adapter(body: RegisterAdapter, swapper: SwapperDep) -> dict[str, Any]:
    """Register an adapter folder as a candidate (replicas validate it when it is promoted)."""
    registry: AsyncAdapterRegistry = swapper.registry
    version = body.version or await registry.next_version()
    try:
        await registry.register(
            version,
            body.path,
            run_id=body.run_id,
            dataset_version=body.dataset_version,
            parent=body.parent,
            metrics=body.metrics,
        )
    except RegistryError as error:
        raise _refused(error) from None
    record = await registry.get(version)
    assert record is not None
    return record.to_dict()


@router.post("/rollback")
async def rollback(swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    try:
        result = await swapper.registry.rollback()
    except RegistryError as error:
        raise _refused(error) from None
    return await _answer(swapper, result, wait)


@router.delete("/pin")
async def unpin(swapper: SwapperDep) -> dict[str, Any]:
    return {"unpinned": await swapper.registry.unpin(), "auto_promotion": True}


class AbortCanary(BaseModel):
    reason: str = Field("aborted by operator", min_length=1, max_length=2000)


@router.get("/canary")
async def canary_status(swapper: SwapperDep) -> dict[str, Any]:
    """The running canary (its record: share, the version it is compared to, the latest check's numbers)."""
    view = await swapper.registry.serving()
    record = view.get(view.canary)
    return {
        "canary": record.to_dict() if record else None,
        "active": view.active,
        "replica": swapper.state()["canary"],
    }


@router.post("/canary/promote")
async def promote_canary(swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    """Promote the running canary now (409 ``no_canary`` when none runs)."""
    view = await swapper.registry.serving()
    try:
        if view.canary is None:
            raise NoCanary("no canary is running")
        result = await swapper.registry.promote_canary(
            view.canary, {"outcome": "promote", "reason": "operator"}, by="admin"
        )
    except RegistryError as error:
        raise _refused(error) from None
    return await _answer(swapper, result, wait)


@router.post("/canary/abort")
async def abort_canary(body: AbortCanary, swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    """End the running canary now: it is retired, the active version stays (409 ``no_canary`` when none runs)."""
    try:
        version = await swapper.registry.abort_canary(None, [body.reason], None, by="admin")
    except RegistryError as error:
        raise _refused(error) from None
    return {**await _answer(swapper, None, wait), "outcome": "rolled_back", "version": version}


@router.get("/{version}")
async def get_adapter(version: str, swapper: SwapperDep) -> dict[str, Any]:
    record = await swapper.registry.get(version)
    if record is None:
        raise ApiError(404, f"No adapter version '{version}' in the registry.", code="adapter_not_found")
    return record.to_dict()


@router.post("/{version}/promote")
async def promote(version: str, swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    try:
        result = await swapper.registry.promote(version, by="admin")
    except RegistryError as error:
        raise _refused(error) from None
    return await _answer(swapper, result, wait)


@router.post("/{version}/pin")
async def pin(version: str, swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    try:
        result = await swapper.registry.pin(version)
    except RegistryError as error:
        raise _refused(error) from None
    return await _answer(swapper, result, wait)


@router.post("/{version}/reject")
async def reject(version: str, body: RejectAdapter, swapper: SwapperDep, wait: bool = False) -> dict[str, Any]:
    try:
        outcome = await swapper.registry.reject(version, [body.reason], "operator", by="admin")
    except RegistryError as error:
        raise _refused(error) from None
    return {**await _answer(swapper, None, wait), "outcome": outcome, "version": version}
