"""Child processes of the `feedloop` command: Redis reachability, a private redis-server, and `feedloop`
subcommands run as children (worker, beat, serve), each in its own process group."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import typer


class ChildError(Exception):
    """A child process could not be started."""


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def free_port() -> int:
    """A free local port below the kernel's ephemeral range, for a server started next. A port picked by binding
    to 0 comes from that range, and until the server binds it anything may take it as its own: an outgoing
    connection's local port, or one of the ports a vLLM engine's worker binds to 0 while it starts
    (torch.distributed's store, gloo). A port below the range is only taken by a server binding it by number."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis(data_dir: Path) -> Iterator[str]:
    """A redis-server of our own with AOF on and noeviction, stopped on exit; yields its URL."""
    server = shutil.which("redis-server")
    if server is None:
        raise ChildError(
            "no Redis answers at REDIS_URL and redis-server is not installed. Install it "
            "(Debian/Ubuntu: `sudo apt-get install redis-server`, macOS: `brew install redis`) or set REDIS_URL "
            "to a running Redis."
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    # fmt: off
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir.resolve()),
         "--appendonly", "yes", "--maxmemory-policy", "noeviction", "--save", "", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    # fmt: on
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not redis_answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise ChildError(f"the private redis-server did not start (exit code {proc.poll()})")
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


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _exit_on_sigterm() -> Any:
    """SIGTERM ends the parent like Ctrl-C (SystemExit unwinds the with-blocks), so its children are stopped
    instead of living on as orphans. Only the main thread may set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _sigterm)


def _restore_sigterm(previous: Any) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def feedloop_children(
    commands: Sequence[Sequence[str]], env: dict[str, str], logs: Path | None = None, stop_timeout_s: float = 30
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """`python -m services.cli <command>` children that live as long as the block, each in its own process
    group (so SIGTERM reaches a worker's threads and beat alike). With `logs`, each writes `<name>.log` there;
    the dict is keyed by the command's first word."""
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    previous = _exit_on_sigterm()
    try:
        for command in commands:
            name = command[0]
            argv = [sys.executable, "-m", "services.cli", *command]
            if logs is None:
                procs[name] = subprocess.Popen(argv, env=env, start_new_session=True)
                continue
            with open(logs / f"{name}.log", "wb") as log:
                procs[name] = subprocess.Popen(
                    argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
        yield procs
    finally:
        _restore_sigterm(previous)
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=stop_timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
