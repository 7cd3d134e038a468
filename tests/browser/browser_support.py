"""Helpers of the browser tests: static host pages on other origins, real completions, and reading
what the API wrote to Redis."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.conftest import ALLOWED_PORT, FORBIDDEN_PORT  # noqa: F401  (re-exported to the browser tests)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
# ALLOWED_PORT is in the live_api server's CORS allow-list, FORBIDDEN_PORT is not (free ports, picked per session)


class _PageHandler(BaseHTTPRequestHandler):
    pages: dict[str, str] = {}

    def do_GET(self) -> None:
        body = self.pages.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_site(port: int, pages: dict[str, str]) -> Iterator[str]:
    """Serve fixed HTML pages on http://127.0.0.1:<port> (another origin than the API) in a thread."""
    handler = type("Pages", (_PageHandler,), {"pages": pages})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def host_page(api_url: str, completion_id: str, token: str, user: str, extra_attrs: str = "") -> str:
    """A third-party page that embeds the widget declaratively, loading the script from the API."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>A product page</title><link rel="icon" href="data:,">
<script src="{api_url}/widget/feedloop.js"></script></head>
<body><main><h1>Support bot</h1><p>Here is the answer the bot gave you.</p>
<div id="rating" data-feedloop-completion="{completion_id}" data-feedloop-token="{token}"
     data-feedloop-user="{user}" {extra_attrs}></div></main></body></html>"""


def new_completion(openai_client: Any, user: str) -> tuple[str, str]:
    """A real completion from the API; returns (completion id, feedback token) signed for `user`."""
    response = openai_client.chat.completions.create(
        model="feedloop", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, user=user
    )
    feedback = response.model_extra["feedback"]
    assert feedback["completion_id"] == response.id
    return feedback["completion_id"], feedback["token"]


def feedback_events(live_api: Any, completion_id: str) -> list[dict[str, Any]]:
    """Every feedback stream event written for one completion, oldest first."""
    events = []
    for _entry_id, fields in live_api.redis.xrange(live_api.keys.feedback_stream):
        try:
            event = json.loads(fields[b"event"])
        except (KeyError, ValueError):
            continue
        if event.get("completion_id") == completion_id:
            events.append(event)
    return events


def wait_for_event(
    live_api: Any, completion_id: str, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        events = feedback_events(live_api, completion_id)
        found = [e for e in events if match(e)]
        if found:
            return found[-1]
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching feedback event for {completion_id}; events: {events}")
        time.sleep(0.1)
