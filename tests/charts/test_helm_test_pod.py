"""The `helm test` pod's script, run as the pod runs it, against a local stand-in of the API's two endpoints
(this checks the script's own logic: what it sends and that a non-2xx answer fails it)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from chartlib import by_kind, env_map, main_container


class StubApi:
    """Answers /v1/chat/completions and /v1/feedback with the contract's shapes, or the status asked for."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.status = {"/v1/chat/completions": 200, "/v1/feedback": 202}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, body))
                status = stub.status.get(self.path, 404)
                if self.path == "/v1/chat/completions":
                    answer = {
                        "id": "chatcmpl-abc",
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}}],
                        "feedback": {
                            "completion_id": "chatcmpl-abc",
                            "token": "tok-123",
                            "expires_at": 2**31,
                        },
                    }
                else:
                    answer = {
                        "completion_id": body.get("completion_id"),
                        "rating": "like",
                        "status": "recorded",
                    }
                if status >= 400:
                    answer = {
                        "error": {
                            "message": "nope",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": None,
                        }
                    }
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def stub_api() -> Iterator[StubApi]:
    stub = StubApi()
    thread = threading.Thread(target=stub.server.serve_forever, daemon=True)
    thread.start()
    yield stub
    stub.server.shutdown()
    stub.server.server_close()


@pytest.fixture(scope="module")
def test_pod_script(render) -> tuple[str, str]:
    (pod,) = [o for o in by_kind(render(), "Pod") if o["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    container = main_container(pod)
    assert container["command"] == ["python", "-c"]
    return container["args"][0], env_map(container)["FEEDLOOP_MODEL"]["value"]


def run_script(script: str, model: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script],
        env={"FEEDLOOP_URL": url, "FEEDLOOP_MODEL": model},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_chats_then_votes_with_the_returned_token(stub_api, test_pod_script):
    script, model = test_pod_script
    result = run_script(script, model, stub_api.url)
    assert result.returncode == 0, result.stderr
    (chat_path, chat), (vote_path, vote) = stub_api.requests
    assert chat_path == "/v1/chat/completions"
    assert chat["model"] == "feedloop" and chat["messages"][0]["role"] == "user"
    assert vote_path == "/v1/feedback"
    assert vote == {
        "completion_id": "chatcmpl-abc",
        "token": "tok-123",
        "rating": "like",
        "user": "helm-test",
    }


@pytest.mark.parametrize("failing_path, status", [("/v1/chat/completions", 503), ("/v1/feedback", 403)])
def test_a_non_2xx_answer_fails_the_test(stub_api, test_pod_script, failing_path, status):
    stub_api.status[failing_path] = status
    script, model = test_pod_script
    result = run_script(script, model, stub_api.url)
    assert result.returncode != 0
    assert f"HTTP Error {status}" in result.stderr
