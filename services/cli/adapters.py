"""`feedloop adapters ...` (the registry) and `feedloop train` (the trigger); both talk to Redis directly.

Mount in services/cli/main.py::

    from services.cli.adapters import adapters_app, train
    app.add_typer(adapters_app, name="adapters")
    app.command("train")(train)
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer

from services.cli.common import fail, redis_context

adapters_app = typer.Typer(help="The adapter registry: list, promote, rollback, pin, revalidate.", no_args_is_help=True)


def _registry() -> Any:
    from services.adapters.registry import AdapterRegistry

    redis, keys, settings = redis_context()
    return AdapterRegistry(redis, keys, alias=settings.engine.alias, reserved=(settings.engine.served_model_name,))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _registry_call(fn: Any, *args: Any) -> Any:
    from services.adapters.registry import RegistryError

    try:
        return fn(*args)
    except RegistryError as error:
        raise fail(str(error)) from None


@adapters_app.command("list")
def list_adapters(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """Every registered version with its status, lineage and gate accuracy."""
    view = _registry().view()
    if as_json:
        typer.echo(json.dumps(view.to_dict(), indent=2))
        return
    pin = f"pinned: {view.pinned} (auto-promotion off)" if view.pinned else "auto-promotion on"
    canary = f"  canary: {view.canary}" if view.canary else ""
    typer.echo(f"active: {view.active or 'base model'}  previous: {view.previous or '-'}  {pin}{canary}")
    typer.echo(f"{'VERSION':<18} {'STATUS':<10} {'DATASET':<11} {'PARENT':<16} {'GATE ACC':>8}  {'CREATED':<19} NOTE")
    for a in view.adapters:
        accuracy = a.gate.get("candidate", {}).get("accuracy") if a.gate else None
        note = "; ".join(a.reasons)[:60] if a.status == "rejected" or a.canary_outcome else (a.activated_by or "")
        if a.status == "canary":
            note = f"canary on {a.canary_share or 0:.0%} of users vs {a.canary_of or 'base model'}"
        typer.echo(
            f"{a.version:<18} {a.status:<10} {a.dataset_version or '-':<11} {a.parent or '-':<16} "
            f"{'-' if accuracy is None else f'{accuracy:.3f}':>8}  {_when(a.created_at):<19}  {note}"
        )


@adapters_app.command()
def promote(version: str) -> None:
    """Make VERSION active on every replica (the old active becomes previous)."""
    result = _registry_call(_registry().promote, version)
    typer.echo(f"{version}: {result.outcome}" + (f" (previous: {result.previous})" if result.previous else ""))


@adapters_app.command()
def rollback() -> None:
    """Make the previous version active again; the current one is retired."""
    result = _registry_call(_registry().rollback)
    if result.outcome == "canary_aborted":
        typer.echo(f"ended the canary {result.previous} (retired); {result.version or 'the base model'} stays active")
        return
    typer.echo(f"rolled back to {result.version} (retired {result.previous or 'nothing'})")


@adapters_app.command()
def pin(version: str) -> None:
    """Promote VERSION and turn auto-promotion off until `feedloop adapters unpin`."""
    result = _registry_call(_registry().pin, version)
    typer.echo(f"{version}: {result.outcome}, pinned (auto-promotion off)")


@adapters_app.command()
def revalidate(version: str) -> None:
    """Check a rejected VERSION's content again here (manifest, base model, rank, modules, sha256); if it
    passes, make it a candidate again (replicas that failed it retry). Promote it afterwards to serve it."""
    from services.adapters.manifest import AdapterRejected, base_model_fingerprint, base_model_id, validate_adapter
    from services.core.config import get_settings

    settings = get_settings()
    registry = _registry()
    record = _registry_call(registry.get, version)
    if record is None:
        raise fail(f"no adapter version {version!r} in the registry")
    if record.status != "rejected":
        raise fail(f"{version} is {record.status}, not rejected: nothing to revalidate")
    model = settings.model_path()
    try:
        validate_adapter(
            record.path,
            base_model_id(model),
            settings.engine.max_lora_rank,
            settings.gate.supported_target_modules,
            served_base_sha256=base_model_fingerprint(model),
            expected_version=version,
        )
    except AdapterRejected as rejection:
        raise fail(f"{version} still fails its checks: {rejection}") from None
    except OSError as error:
        raise fail(f"cannot read {record.path} here: {error}") from None
    outcome = _registry_call(registry.revalidate, version, "operator (feedloop adapters revalidate)")
    typer.echo(f"{version}: {outcome} (was rejected: {'; '.join(record.reasons) or '-'}); promote it to serve it")


@adapters_app.command()
def unpin() -> None:
    """Turn auto-promotion back on."""
    pinned = _registry().unpin()
    typer.echo(f"unpinned {pinned}" if pinned else "nothing was pinned")


canary_app = typer.Typer(help="The running canary: status, promote, abort.", no_args_is_help=True)
adapters_app.add_typer(canary_app, name="canary")


def _canary_status() -> dict[str, Any]:
    view = _registry().serving()
    record = view.get(view.canary)
    if record is None:
        return {"canary": None, "active": view.active}
    return {
        "canary": record.version,
        "compared_to": record.canary_of,
        "share": record.canary_share,
        "started_at": record.canary_started_at,
        "running_s": time.time() - (record.canary_started_at or time.time()),
        "latest_check": record.canary_check or None,
        "active": view.active,
    }


@canary_app.command("status")
def canary_status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False) -> None:
    """The running canary: its share, what it is compared to, and the latest check's numbers."""
    status = _canary_status()
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    if status["canary"] is None:
        typer.echo(f"no canary running; active: {status['active'] or 'base model'}")
        return
    typer.echo(
        f"canary {status['canary']} on {status['share']:.0%} of users vs {status['compared_to'] or 'base model'}, "
        f"running {status['running_s']:.0f}s"
    )
    check = status["latest_check"]
    if not check:
        typer.echo("not checked yet")
        return
    for arm in ("canary", "active"):
        a = check[arm]
        rate = "-" if a["like_rate"] is None or a["like_rate"] != a["like_rate"] else f"{a['like_rate']:.3f}"
        typer.echo(f"  {arm:<7} users {a['users']:>5}  votes {a['votes']:>6}  like-rate {rate}")
    typer.echo(f"  latest check: {check['outcome']}: {check['reason']}")


@canary_app.command("promote")
def canary_promote() -> None:
    """Promote the running canary now (it becomes active on every replica)."""
    version = _canary_status()["canary"]
    if version is None:
        raise fail("no canary is running")
    result = _registry_call(
        _registry().promote_canary, version, {"outcome": "promote", "reason": "operator"}, "operator"
    )
    typer.echo(f"{version}: {result.outcome} (previous: {result.previous or 'base model'})")


@canary_app.command("abort")
def canary_abort(
    reason: Annotated[str, typer.Option("--reason", help="Why (kept in the version's record)")] = "aborted by operator",
) -> None:
    """End the running canary now: it is retired, the active version stays."""
    version = _registry_call(_registry().abort_canary, None, [reason], None, "operator")
    typer.echo(f"{version}: rolled back (retired); the active version stays")


def train(
    now: Annotated[
        bool,
        typer.Option("--now", help="Start a run now, whatever the trigger rule says (never two at once)"),
    ] = False,
    enqueue: Annotated[
        bool,
        typer.Option("--enqueue", help="With --now: send the run to the train queue instead of running here"),
    ] = False,
) -> None:
    """Training: without options, show the trigger's view and recent runs; --now forces a run."""
    from workers.training.runs import RunStore
    from workers.training.trigger import Trigger

    redis, keys, settings = redis_context()
    trigger = Trigger(redis, keys, settings)
    if not now:
        decision = trigger.evaluate()
        typer.echo(
            f"trigger: {'would start' if decision.start else 'waits'} ({decision.reason}); "
            f"{decision.new_pairs} new pairs (min {settings.training.min_pairs}, "
            f"floor {settings.training.min_pairs_floor} after {settings.training.max_interval_s}s)"
        )
        for run in RunStore(redis, keys).recent(10):
            typer.echo(
                f"{run['run_id']:<10} {run.get('status') or '-':<9} {_when(run.get('created_at'))}  "
                f"dataset={run.get('dataset_version') or '-'} version={run.get('version') or '-'} "
                f"{(run.get('error') or '')[:80]}"
            )
        return
    send = None
    if enqueue:
        from workers.tasks import enqueue_run

        send = enqueue_run
    result = trigger.check(enqueue=send, force=True)
    if result.action != "started" or result.run_id is None:
        raise fail(f"no run started: {result.reason} {result.run_id or ''}".strip())
    if enqueue:
        typer.echo(f"{result.run_id} queued on the train queue")
        return
    import logging

    from workers.training.job import execute

    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    typer.echo(f"{result.run_id}: training here")
    record = execute(redis, keys, settings, result.run_id)
    typer.echo(json.dumps({k: record.get(k) for k in ("run_id", "status", "version", "dataset_version", "gate")}))
    if record.get("status") == "failed":
        raise fail(record.get("error") or "the run failed")
