"""The `feedloop` command."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlparse

import typer

from services.config import DEFAULT_MODEL_DIR, Settings, get_settings

app = typer.Typer(
    help="feedloop: chat on vLLM, collect feedback, train DPO adapters, hot-swap them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> typer.Exit:
    typer.secho(f"feedloop: {message}", fg="red", err=True)
    return typer.Exit(code=1)


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _require_engine() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise fail(
            f"vLLM is not installed ({e}). Run `make install` (CPU), or `pip install 'feedloop[cpu]'` / "
            "`pip install 'feedloop[gpu]'`."
        ) from None


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis(data_dir: Path):
    """A redis-server of our own with AOF on and noeviction, stopped on exit."""
    server = shutil.which("redis-server")
    if server is None:
        raise fail(
            "no Redis answers at REDIS_URL and redis-server is not installed. Install it "
            "(Debian/Ubuntu: `sudo apt-get install redis-server`, macOS: `brew install redis`) or set REDIS_URL "
            "to a running Redis."
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc = subprocess.Popen(
        [
            server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data_dir.resolve()),
            "--appendonly",
            "yes",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--protected-mode",
            "yes",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise fail(f"the private redis-server did not start (exit code {proc.poll()})")
        time.sleep(0.05)
    typer.echo(f"feedloop: started a private Redis at {url} (data in {data_dir})")
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        typer.echo("feedloop: private Redis stopped")


def ensure_model(settings: Settings) -> str:
    path = settings.model_path()
    if Path(path, "config.json").exists():
        return path
    if settings.engine.model:
        raise fail(f"no model at {path} (FEEDLOOP_ENGINE__MODEL): point it at a Hugging Face model folder")
    from services.tinymodel import build_tiny_model

    typer.echo(f"feedloop: no demo model in {DEFAULT_MODEL_DIR}; building the tiny random model in {path}")
    return str(build_tiny_model(Path(path)))


def _run_api(settings: Settings) -> None:
    import uvicorn

    from services.api.app import create_app

    typer.echo(
        f"feedloop: serving {settings.model_path()} on http://{settings.api.host}:{settings.api.port} "
        f"(models: {settings.engine.alias}, {settings.engine.served_model_name})"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.api.host,
        port=settings.api.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.api.keep_alive_s,
    )


@app.command()
def serve() -> None:
    """Serve the API and the engine (needs a reachable Redis at REDIS_URL)."""
    settings = get_settings()
    _configure_logging(settings)
    _require_engine()
    if not redis_answers(settings.redis_url):
        raise fail(f"no Redis answers at {settings.redis_url}: set REDIS_URL, or use `feedloop up`")
    ensure_model(settings)
    _run_api(settings)


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated queues: pairs (CPU), train (GPU)")] = "pairs,train",
    concurrency: Annotated[int, typer.Option(help="Tasks run at once (threads)")] = 2,
) -> None:
    """Run a Celery worker (threads pool: one process, so its Prometheus metrics are complete)."""
    settings = get_settings()
    _configure_logging(settings)
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
    _configure_logging(settings)
    if not redis_answers(settings.redis_url):
        raise fail(f"no Redis answers at {settings.redis_url}: set REDIS_URL")
    from workers.celery_app import app as celery

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery.start(
        ["beat", "--loglevel", settings.log_level, "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    )


@contextmanager
def background(commands: list[list[str]], env: dict[str, str]):
    """Child processes (worker, beat) that live as long as the block, each in its own process group."""
    procs = [
        subprocess.Popen([sys.executable, "-m", "services.cli", *cmd], env=env, start_new_session=True)
        for cmd in commands
    ]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@app.command()
def up(
    port: Annotated[int | None, typer.Option(help="API port (default: settings)")] = None,
    workers: Annotated[bool, typer.Option(help="Also run a Celery worker and beat")] = True,
) -> None:
    """Run everything on this machine: Redis (private if none answers), a worker, beat, the API and engine."""
    settings = get_settings()
    _configure_logging(settings)
    _require_engine()
    if port is not None:
        settings.api.port = port
    ensure_model(settings)
    with ExitStack() as stack:
        if not redis_answers(settings.redis_url):
            url = stack.enter_context(private_redis(settings.data_dir / "redis"))
            settings = settings.model_copy(update={"redis_url": url})
        env = {
            **os.environ,
            "FEEDLOOP_REDIS_URL": settings.redis_url,
            "FEEDLOOP_ENGINE__MODEL": settings.model_path(),
            "FEEDLOOP_API__PORT": str(settings.api.port),
        }
        if workers:
            stack.enter_context(background([["worker"], ["beat"]], env))
        api = f"http://{settings.api.host}:{settings.api.port}"
        typer.echo(
            f"feedloop: demo chat page {api}/ · OpenAI API {api}/v1 · metrics {api}/metrics"
            + (f" and http://127.0.0.1:{settings.metrics_port}/metrics (worker)" if workers else "")
        )
        _run_api(settings)


@app.command("settings")
def show_settings(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the README's settings table")] = False,
) -> None:
    """Print the effective settings (or the documented table of every knob)."""
    from services.settings_doc import settings_table

    if markdown:
        typer.echo(settings_table())
    else:
        typer.echo(get_settings().model_dump_json(indent=2))


def _mount_subcommands() -> None:
    from workers.cli_pairs import pairs_app

    app.add_typer(pairs_app, name="pairs", help="Preference pairs: stats, snapshots, exports.")
    from services.cli_demo import demo_app

    app.add_typer(demo_app)
    from services.cli_adapters import adapters_app, train

    app.add_typer(adapters_app, name="adapters")
    app.command("train")(train)


_mount_subcommands()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
