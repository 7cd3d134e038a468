"""`feedloop up` and `feedloop demo` start a worker and beat as children: a SIGTERM to the parent (what an
orchestrator or `kill` sends) must stop them too, not leave them running as orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]

PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from services.cli.procs import feedloop_children
    import os
    with feedloop_children([["beat"]], dict(os.environ), logs=Path(sys.argv[1]), stop_timeout_s=20) as procs:
        print(procs["beat"].pid, flush=True)
        time.sleep(600)
    """
)


def test_sigterm_to_the_parent_stops_its_children(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FEEDLOOP_REDIS_URL": os.environ.get("FEEDLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
        "FEEDLOOP_REDIS_PREFIX": f"children-{uuid.uuid4().hex[:6]}",
        "FEEDLOOP_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPATH": str(REPO),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "logs")], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM
        _gone, alive = psutil.wait_procs([child], timeout=30)
        assert not alive, (tmp_path / "logs" / "beat.log").read_text()[-2000:]
    finally:
        if parent.poll() is None:
            parent.kill()
