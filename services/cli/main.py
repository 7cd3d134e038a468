"""The `feedloop` command."""

from __future__ import annotations

import os
import secrets
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import configure_logging, fail, require_engine
from services.cli.procs import ChildError, feedloop_children, private_redis, redis_answers
from services.core.config import DEFAULT_FEEDBACK_SECRET, Settings, get_settings

app = typer.Typer(
    help="feedloop: chat on vLLM, collect feedback, train DPO adapters, hot-swap them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def ensure_model(settings: Settings) -> str:
    """The served model's folder: FEEDLOOP_ENGINE__MODEL, else the default packaged model (imported once)."""
    path = settings.model_path()
    if Path(path, "config.json").exists():
        return path
    if settings.engine.model:
        raise fail(f"no model at {path} (FEEDLOOP_ENGINE__MODEL): point it at a Hugging Face model folder")
    from services.cli.models import ensure_default_model

    return ensure_default_model(settings)


SECRET_FILE = "feedback-secret"


def embedded_secret(data_dir: Path) -> str:
    """`feedloop up`'s feedback secret: generated once, kept (mode 0600) in the data dir, reused after."""
    path = Path(data_dir) / SECRET_FILE
    if path.exists():
        kept = path.read_text().strip()
        if kept:
            return kept
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)
    return value


def _refuse_weak_secret(settings: Settings) -> None:
    """Outside the embedded default, the feedback secret must be set: anyone who read the README knows the
    default, and could forge feedback tokens and reverse the keyed IP hashes."""
    if not settings.feedback.secret or settings.feedback.secret == DEFAULT_FEEDBACK_SECRET:
        raise fail(
            "FEEDLOOP_FEEDBACK__SECRET is empty or the documented default: set a random secret (e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`), or use `feedloop up`, which "
            "generates one in the data dir."
        )


def _bind_api_port(settings: Settings) -> socket.socket:
    """The API's port, taken before anything slow starts. The engine's worker opens random local ports of its
    own while it starts (torch.distributed's store, gloo), and one of them could otherwise take this port, leaving
    the API unable to listen after minutes of loading; a port already in use fails here, at once. The socket is
    bound, not yet listening: connections are refused until the API is up, as before."""
    host, port = settings.api.host, settings.api.port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise fail(f"cannot listen on {host}:{port}: {error} (FEEDLOOP_API__HOST)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise fail(
            f"cannot listen on {host}:{port}: {error.strerror} (another process has it? choose another port with "
            "FEEDLOOP_API__PORT)"
        ) from None
    return sock


def _run_api(settings: Settings, sock: socket.socket) -> None:
    import uvicorn

    from services.api.app import create_app

    typer.echo(
        f"feedloop: serving {settings.model_path()} on http://{settings.api.host}:{settings.api.port} "
        f"(models: {settings.engine.alias}, {settings.engine.served_model_name})"
    )
    if settings.api.auth:
        typer.echo("feedloop: auth on: the chat API needs an API key (`feedloop keys create --app NAME`)")
    else:
        typer.echo(
            "feedloop: auth off: anyone who reaches this port can chat (FEEDLOOP_API__AUTH=true requires API keys)"
        )
    config = uvicorn.Config(
        create_app(settings),
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.api.keep_alive_s,
        # the client address is decided by api.trusted_proxy_hops alone (uvicorn would otherwise take
        # X-Forwarded-For from any connection on 127.0.0.1)
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        raise typer.Exit(code=1)


@app.command()
def serve() -> None:
    """Serve the API and the engine (needs a reachable Redis at REDIS_URL)."""
    settings = get_settings()
    configure_logging(settings)
    _refuse_weak_secret(settings)
    require_engine()
    sock = _bind_api_port(settings)
    if not redis_answers(settings.redis_url):
        raise fail(f"no Redis answers at {settings.redis_url}: set REDIS_URL, or use `feedloop up`")
    ensure_model(settings)
    _run_api(settings, sock)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: pairs (CPU), train (GPU)")] = "pairs,train",
    concurrency: Annotated[int, typer.Option(help="Tasks run at once (threads)")] = 2,
) -> None:
    """Run a Celery worker (threads pool: one process, so its Prometheus metrics are complete)."""
    settings = get_settings()
    configure_logging(settings)
    if not redis_answers(settings.redis_url):
        raise fail(f"no Redis answers at {settings.redis_url}: set REDIS_URL")
    from workers.celery_app import app as celery

    celery.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "--pool",
            "threads",
            "--concurrency",
            str(concurrency),
            "--loglevel",
            settings.log_level,
            "-n",
            f"feedloop-{queues.replace(',', '-')}@%h",
        ]
    )


@app.command()
def beat() -> None:
    """Run Celery beat, the scheduler (run exactly one; the tasks it sends are idempotent anyway)."""
    settings = get_settings()
    configure_logging(settings)
    if not redis_answers(settings.redis_url):
        raise fail(f"no Redis answers at {settings.redis_url}: set REDIS_URL")
    from workers.celery_app import app as celery

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery.start(
        ["beat", "--loglevel", settings.log_level, "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    )


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="API port (default: settings)")] = None,
    workers: Annotated[bool, typer.Option(help="Also run a Celery worker and beat")] = True,
) -> None:
    """Run everything on this machine: Redis (private if none answers), a worker, beat, the API and engine."""
    settings = get_settings()
    configure_logging(settings)
    require_engine()
    if port is not None:
        settings.api.port = port
    settings.api.demo_page = True  # the embedded default shows the demo chat page at /
    if "FEEDLOOP_API__AUTH" not in os.environ:
        settings.api.auth = False  # one machine, the demo page chats without a key; the banner says so
    if "FEEDLOOP_CANARY__SHARE" not in os.environ:
        settings.canary.share = 0.0  # a handful of local users can never decide a canary: promote straight away
    if not settings.feedback.secret or settings.feedback.secret == DEFAULT_FEEDBACK_SECRET:
        settings.feedback.secret = embedded_secret(settings.data_dir)
    sock = _bind_api_port(settings)
    ensure_model(settings)
    with ExitStack() as stack:
        if not redis_answers(settings.redis_url):
            try:
                url = stack.enter_context(private_redis(settings.data_dir / "redis"))
            except ChildError as e:
                raise fail(str(e)) from None
            settings = settings.model_copy(update={"redis_url": url})
        env = {
            **os.environ,
            "FEEDLOOP_REDIS_URL": settings.redis_url,
            "FEEDLOOP_ENGINE__MODEL": settings.model_path(),
            "FEEDLOOP_API__PORT": str(settings.api.port),
            "FEEDLOOP_API__DEMO_PAGE": "true",
            "FEEDLOOP_API__AUTH": "true" if settings.api.auth else "false",
            "FEEDLOOP_FEEDBACK__SECRET": settings.feedback.secret,
            "FEEDLOOP_CANARY__SHARE": repr(settings.canary.share),
        }
        if workers:
            stack.enter_context(feedloop_children([["worker"], ["beat"]], env, stop_timeout_s=20))
        api = f"http://{settings.api.host}:{settings.api.port}"
        typer.echo(
            f"feedloop: demo chat page {api}/ · OpenAI API {api}/v1 · metrics {api}/metrics"
            + (f" and http://127.0.0.1:{settings.metrics_port}/metrics (worker)" if workers else "")
        )
        typer.echo(
            "feedloop: new adapters that pass the gate "
            + (
                f"first serve {settings.canary.share:.0%} of users as a canary (their votes decide)"
                if settings.canary.share > 0
                else "serve everyone at once (no canary on one machine; set FEEDLOOP_CANARY__SHARE for one)"
            )
        )
        _run_api(settings, sock)


@app.command("settings")
def show_settings(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's settings table")] = False,
) -> None:
    """Print the effective settings (or the documented table of every knob)."""
    from services.core.settings_doc import settings_table

    if markdown:
        typer.echo(settings_table())
    else:
        typer.echo(get_settings().model_dump_json(indent=2))


def _mount_subcommands() -> None:
    from services.cli.pairs import pairs_app

    app.add_typer(pairs_app, name="pairs", help="Preference pairs: stats, snapshots, exports.")
    from demo.cli import demo_app

    app.add_typer(demo_app)
    from services.cli.models import models_app

    app.add_typer(models_app, name="models")
    from services.cli.adapters import adapters_app, train

    app.add_typer(adapters_app, name="adapters")
    app.command("train")(train)
    from services.cli.keys import keys_app

    app.add_typer(keys_app, name="keys")


_mount_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
