"""`feedloop keys create --app NAME | list | revoke ID`: the chat API's keys."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from services.core.apikeys import ApiKeyError, ApiKeyStore
from services.core.config import get_settings
from services.core.keys import Keys
from services.core.redis import connect_sync

keys_app = typer.Typer(help="API keys: create, list, revoke (stored hashed in Redis; a key is shown once).")


def _store() -> ApiKeyStore:
    settings = get_settings()
    return ApiKeyStore(connect_sync(settings.redis_url, settings), Keys(settings.redis_prefix))


@keys_app.command("create")
def create(
    app_name: Annotated[str, typer.Option("--app", help="The app the key speaks for (its users become app:user)")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin key (/admin routes) instead of an app key")] = False,
    chat_rate: Annotated[
        float, typer.Option(help="Chat requests/s of this app (-1: FEEDLOOP_API__APP_CHAT_RATE, 0: unlimited)")
    ] = -1.0,
    vote_rate: Annotated[
        float, typer.Option(help="Votes/s of this app (-1: FEEDLOOP_FEEDBACK__RATE_PER_APP, 0: unlimited)")
    ] = -1.0,
) -> None:
    """Create a key; it is printed once (only its sha256 is kept)."""
    try:
        secret, key = _store().create(app_name, "admin" if admin else "app", chat_rate=chat_rate, vote_rate=vote_rate)
    except ApiKeyError as e:
        typer.secho(f"feedloop: {e}", fg="red", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(secret)
    typer.echo(f"id {key.id} · app {key.app} · {key.role} key · shown once: store it now", err=True)


@keys_app.command("list")
def list_keys() -> None:
    """List keys (id, app, role, creation time); the keys themselves are not stored."""
    keys = _store().list()
    if not keys:
        typer.echo("no API keys")
        return
    typer.echo(f"{'id':<14}{'app':<24}{'role':<8}{'chat/s':>8}{'votes/s':>9}  created")
    for k in keys:
        created = datetime.datetime.fromtimestamp(k.created_at, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        rates = [("default" if r < 0 else f"{r:g}") for r in (k.chat_rate, k.vote_rate)]
        typer.echo(f"{k.id:<14}{k.app:<24}{k.role:<8}{rates[0]:>8}{rates[1]:>9}  {created}")


@keys_app.command("revoke")
def revoke(key: Annotated[str, typer.Argument(help="The key's id (from `list`) or the key itself")]) -> None:
    """Revoke a key (API replicas stop accepting it within FEEDLOOP_API__KEY_CACHE_S)."""
    revoked = _store().revoke(key)
    if revoked is None:
        typer.secho("feedloop: no such key", fg="red", err=True)
        raise typer.Exit(code=1)
    typer.echo(f"revoked {revoked.id} (app {revoked.app}, {revoked.role} key)")
