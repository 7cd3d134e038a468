"""`feedloop pairs ...`: inspect pairing, freeze dataset versions, export them."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from services.cli.common import redis_context

pairs_app = typer.Typer(help="Preference pairs: stats, dataset snapshots, exports.", no_args_is_help=True)


class Format(StrEnum):
    dpo = "dpo"
    kto = "kto"


class Split(StrEnum):
    train = "train"
    eval = "eval"
    all = "all"


def collect_stats() -> dict[str, Any]:
    from workers.pairing import datasets, quality

    redis, keys, settings = redis_context()
    stats = quality.read_stats(redis, keys.pairs_stats)
    group: dict[str, Any] = {}
    if redis.exists(keys.feedback_stream):
        for info in redis.xinfo_groups(keys.feedback_stream):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name == settings.pairs.consumer_group:
                group = {
                    "pending": int(info["pending"]),
                    "lag": info.get("lag"),
                    "consumers": int(info["consumers"]),
                    "last_delivered_id": _text(info["last-delivered-id"]),
                }
    latest = datasets.latest_version(redis, keys)
    manifest = datasets.load_manifest(redis, keys, latest) if latest else None
    return {
        "pairs_stored": int(redis.zcard(keys.pairs_index)),
        "created_by_strategy": stats.created,
        "dropped_by_filter": {f"{name}:{reason}": n for (name, reason), n in sorted(stats.dropped.items())},
        "pii_masked": stats.pii,
        "dead_lettered": int(redis.xlen(keys.feedback_dead_letter)) if redis.exists(keys.feedback_dead_letter) else 0,
        "stream": {
            "length": int(redis.xlen(keys.feedback_stream)) if redis.exists(keys.feedback_stream) else 0,
            **group,
        },
        "generation_candidates": {
            s: int(redis.zcard(keys.pairing_candidates(s))) for s in ("weaker_answer", "stronger_answer")
        },
        "latest_dataset": None
        if manifest is None
        else {
            "version": manifest["version"],
            "counts": manifest["counts"],
            "strategies": manifest["strategies"],
            "filters": manifest["filters"],
            "user_cap": manifest["user_cap"],
            "app_cap": manifest.get("app_cap"),
            "contributions": manifest.get("contributions", {}),
            "kto_contributions": manifest.get("kto_contributions", {}),
            "new_pairs_since": datasets.count_new_pairs(redis, keys, manifest["version"]),
        },
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@pairs_app.command()
def stats(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Pairs by strategy, drops by filter, user cap, stream backlog and lag."""
    data = collect_stats()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"pairs stored: {data['pairs_stored']}")
    for strategy, n in sorted(data["created_by_strategy"].items()):
        typer.echo(f"  created {strategy:<16} {n}")
    for name, n in data["dropped_by_filter"].items():
        typer.echo(f"  dropped {name:<32} {n}")
    for kind, n in sorted(data["pii_masked"].items()):
        typer.echo(f"  pii masked {kind:<13} {n}")
    stream = data["stream"]
    typer.echo(
        f"stream: length {stream['length']}, pending {stream.get('pending', 0)}, lag {stream.get('lag')}, "
        f"dead-lettered {data['dead_lettered']}"
    )
    typer.echo(f"generation candidates: {data['generation_candidates']}")
    latest = data["latest_dataset"]
    if latest:
        typer.echo(
            f"latest dataset {latest['version']}: {latest['counts']}, user cap {latest['user_cap']}, "
            f"filters {latest['filters']}, new pairs since {latest['new_pairs_since']}"
        )
        for name, key in (("pairs", "contributions"), ("kto rows", "kto_contributions")):
            for kind in ("apps", "users"):
                counts = latest[key].get(kind) or {}
                if counts:
                    shown = ", ".join(f"{who} {n}" for who, n in counts.items())
                    typer.echo(f"  {name} by {kind[:-1]} (top 20): {shown}")


@pairs_app.command()
def snapshot() -> None:
    """Freeze the current pairs into a new dataset version."""
    from workers.pairing import datasets

    redis, keys, settings = redis_context()
    try:
        manifest = datasets.snapshot(redis, keys, settings)
    except datasets.SnapshotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(manifest, indent=2))


@pairs_app.command()
def export(
    version: Annotated[str, typer.Option("--version", "-v", help="Dataset version, e.g. ds-000001; 'latest'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    fmt: Annotated[Format, typer.Option("--format", "-f", help="dpo (pairs) or kto (unpaired).")] = Format.dpo,
    split: Annotated[Split, typer.Option(help="dpo only: train, eval or all.")] = Split.all,
) -> None:
    """Write one dataset version as JSONL."""
    from workers.pairing import datasets

    redis, keys, _ = redis_context()
    if version == "latest":
        version = datasets.latest_version(redis, keys) or ""
    try:
        rows = datasets.export(redis, keys, version, fmt.value, out, split.value)
    except datasets.SnapshotError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{rows} rows of {version} ({fmt.value}) written to {out}")
