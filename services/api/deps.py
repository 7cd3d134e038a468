"""Annotated dependencies: what routes get from the app's state."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from redis.asyncio import Redis

from services.core.config import Settings
from services.core.keys import Keys
from services.engine.engine import Engine
from services.feedback.interactions import InteractionLog


async def _settings(request: Request) -> Settings:
    return request.app.state.settings


async def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def _redis(request: Request) -> Redis:
    return request.app.state.redis


async def _keys(request: Request) -> Keys:
    return request.app.state.keys


async def _interactions(request: Request) -> InteractionLog:
    return request.app.state.interactions


async def _canary(request: Request) -> tuple[str, float] | None:
    """(version, share) of the canary this replica serves (loaded and warmed up), or None."""
    swapper = getattr(request.app.state, "swapper", None)
    return swapper.canary if swapper is not None else None


SettingsDep = Annotated[Settings, Depends(_settings)]
EngineDep = Annotated[Engine, Depends(_engine)]
RedisDep = Annotated[Redis, Depends(_redis)]
KeysDep = Annotated[Keys, Depends(_keys)]
InteractionsDep = Annotated[InteractionLog, Depends(_interactions)]
CanaryDep = Annotated[tuple[str, float] | None, Depends(_canary)]
