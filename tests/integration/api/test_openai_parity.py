"""Conformance with vLLM's own OpenAI server: the same requests, through the official `openai` client, to
feedloop (the shared `live_api`) and to `python -m vllm.entrypoints.openai.api_server` started once for this
module on the same tiny model, engine arguments (bench/chat_vs_vllm.engine_argv), chat template
(tests/support/tool_chat_template.jinja) and tool parser (hermes). Responses are compared by shape: the fields
present and their JSON types (lists by their first item), finish reasons, choice indices and usage; greedy
answers also by text. Fields that only one side sends on purpose are listed in IGNORED (README: "Differences
from vLLM's OpenAI server").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.core.config import Settings
from tests.conftest import ARTIFACTS, REPO, LiveApi, free_port
from tests.support.tools import TOOL_TEMPLATE, WEATHER

HELLO = [{"role": "user", "content": "Hello! What is the capital of France?"}]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
# Sent by one side only, on purpose: our feedback token; vLLM's extensions and OpenAI fields it fills with
# defaults (service_tier); system_fingerprint is compared as present, not by value (ours names the adapter).
IGNORED = {
    "feedback",
    "stop_reason",
    "token_ids",
    "prompt_token_ids",
    "prompt_logprobs",
    "prompt_text",
    "kv_transfer_params",
    "ec_transfer_params",
    "metrics",
    "service_tier",
    "reasoning",
    "routed_experts",
}


def shape(value: Any) -> Any:
    """The JSON shape of a value: objects by their non-null fields, lists by their first item, scalars by type."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items() if v is not None and v != [] and k not in IGNORED}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


@pytest.fixture(scope="module")
def vllm_proc(tiny_model_dir: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """vLLM's own server, started before live_api is waited for, so that both start at once."""
    sys.path.insert(0, str(REPO))
    from bench.chat_vs_vllm import engine_argv

    settings = Settings(engine={"model": str(tiny_model_dir), "max_model_len": 1024})
    port = free_port()
    argv = [
        *engine_argv(settings, str(tiny_model_dir), port),
        "--chat-template",
        str(TOOL_TEMPLATE),
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
    ]
    log_path = ARTIFACTS / "logs" / "parity-vllm.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kvcache_gib)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def clients(vllm_proc: tuple[subprocess.Popen, str], live_api: LiveApi) -> tuple[openai.OpenAI, openai.OpenAI]:
    proc, url = vllm_proc
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with {proc.returncode}; see {ARTIFACTS / 'logs'}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("vLLM's server was not ready in 300 s")
        time.sleep(0.5)
    ours = openai.OpenAI(base_url=live_api.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    theirs = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return ours, theirs


def _models(live_api: LiveApi) -> tuple[str, str]:
    """Our model name and vLLM's for the same base model."""
    return live_api.settings.engine.served_model_name, live_api.settings.engine.served_model_name


def both_chat(clients, live_api: LiveApi, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ours, theirs = clients
    name, their_name = _models(live_api)
    a = ours.chat.completions.create(model=name, **kwargs).model_dump(exclude_unset=True)
    b = theirs.chat.completions.create(model=their_name, **kwargs).model_dump(exclude_unset=True)
    return a, b


def both_chat_stream(clients, live_api: LiveApi, **kwargs: Any) -> tuple[list[dict], list[dict]]:
    ours, theirs = clients
    name, their_name = _models(live_api)
    a = [c.model_dump(exclude_unset=True) for c in ours.chat.completions.create(model=name, stream=True, **kwargs)]
    b = [
        c.model_dump(exclude_unset=True)
        for c in theirs.chat.completions.create(model=their_name, stream=True, **kwargs)
    ]
    return a, b


def stream_summary(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stream must agree on: chunk fields, choice fields, delta fields, indices, finish reasons, usage."""
    summary: dict[str, Any] = {"chunk": {}, "choice": {}, "delta": {}, "finish": {}, "usage": None, "logprobs": None}
    for chunk in chunks:
        summary["chunk"].update({k: v for k, v in shape(chunk).items() if k not in ("choices", "usage")})
        if chunk.get("usage"):
            summary["usage"] = shape(chunk["usage"])
        for choice in chunk["choices"]:
            summary["choice"].update({k: v for k, v in shape(choice).items() if k not in ("delta", "logprobs")})
            summary["delta"].update({k: v for k, v in shape(choice["delta"]).items() if k != "content"})
            if choice.get("logprobs") and choice["logprobs"].get("content"):
                summary["logprobs"] = shape(choice["logprobs"])
            if choice.get("finish_reason"):
                summary["finish"][choice["index"]] = choice["finish_reason"]
    summary["chunk"].pop("system_fingerprint", None)  # vLLM sends it on the last chunk only
    return summary


def text_of(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for chunk in chunks for c in chunk["choices"] if c["index"] == index)


# ---- chat: plain matrix ------------------------------------------------------------------------------------
PLAIN = {
    "greedy": {"temperature": 0, "max_tokens": 12},
    "n3": {"n": 3, "temperature": 1.0, "seed": 7, "max_tokens": 8},
    "stop-string": {"temperature": 0, "max_tokens": 30, "stop": "e"},
    "stop-list": {"temperature": 0, "max_tokens": 30, "stop": ["e", "a"]},
    "seed": {"temperature": 1.0, "seed": 1234, "max_tokens": 12},
    "logprobs": {"temperature": 0, "max_tokens": 6, "logprobs": True, "top_logprobs": 2},
    "json-object": {"temperature": 0, "max_tokens": 40, "response_format": {"type": "json_object"}},
    "json-schema": {
        "temperature": 0,
        "max_tokens": 60,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}},
    },
}


@pytest.mark.parametrize("case", list(PLAIN))
def test_chat_matches_vllm(clients, live_api: LiveApi, case: str):
    a, b = both_chat(clients, live_api, messages=HELLO, **PLAIN[case])
    assert shape(a) == shape(b)
    assert [c["finish_reason"] for c in a["choices"]] == [c["finish_reason"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [c["index"] for c in b["choices"]]
    assert a["usage"]["prompt_tokens"] == b["usage"]["prompt_tokens"]
    assert "feedback" in a and a["system_fingerprint"]
    if PLAIN[case].get("temperature") == 0 or "seed" in PLAIN[case]:
        assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    if case == "logprobs":
        ours, theirs = a["choices"][0]["logprobs"]["content"], b["choices"][0]["logprobs"]["content"]
        assert [t["token"] for t in ours] == [t["token"] for t in theirs]
        assert all(len(t["top_logprobs"]) == 2 for t in ours)
        assert [round(t["logprob"], 3) for t in ours] == [round(t["logprob"], 3) for t in theirs]
    if case.startswith("json") and a["choices"][0]["finish_reason"] == "stop":
        parsed = json.loads(a["choices"][0]["message"]["content"])
        assert isinstance(parsed, dict)
        if case == "json-schema":
            assert parsed["answer"] in ("yes", "no")


@pytest.mark.parametrize("case", ["greedy", "n3", "logprobs", "json-schema"])
def test_chat_stream_matches_vllm(clients, live_api: LiveApi, case: str):
    kwargs = {**PLAIN[case], "stream_options": {"include_usage": True}}
    a, b = both_chat_stream(clients, live_api, messages=HELLO, **kwargs)
    assert stream_summary(a) == stream_summary(b)
    assert "feedback" in a[-1]
    for i in range(PLAIN[case].get("n", 1)):
        if PLAIN[case].get("temperature") == 0 or "seed" in PLAIN[case]:
            assert text_of(a, i) == text_of(b, i)


def test_max_tokens_over_the_context_is_refused_alike(clients, live_api: LiveApi):
    statuses = []
    for client in clients:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=_models(live_api)[0], messages=HELLO, max_tokens=5000)
        statuses.append(e.value.status_code)
    assert statuses == [400, 400]


# ---- tools -------------------------------------------------------------------------------------------------
TOOL_CASES = {
    "none": {"tool_choice": "none"},
    "auto": {"tool_choice": "auto"},
    "required": {"tool_choice": "required"},
    "required-single": {"tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}


@pytest.mark.parametrize("case", list(TOOL_CASES))
def test_tools_match_vllm(clients, live_api: LiveApi, case: str):
    kwargs = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
              "temperature": 0, "max_tokens": 80, **TOOL_CASES[case]}  # fmt: skip
    a, b = both_chat(clients, live_api, **kwargs)
    assert shape(a) == shape(b)
    assert a["choices"][0]["finish_reason"] == b["choices"][0]["finish_reason"]
    calls_a = a["choices"][0]["message"].get("tool_calls") or []
    calls_b = b["choices"][0]["message"].get("tool_calls") or []
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls_a] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls_b
    ]
    if case in ("required-single", "named"):  # one call: the grammar ends it
        assert len(calls_a) == 1 and calls_a[0]["function"]["name"] == "get_weather"
        assert a["choices"][0]["finish_reason"] == ("tool_calls" if case == "required-single" else "stop")
    if case == "none":
        assert not calls_a


@pytest.mark.parametrize("case", ["auto", "required-single", "named"])
def test_tools_stream_match_vllm(clients, live_api: LiveApi, case: str):
    kwargs = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER],
              "temperature": 0, "max_tokens": 80, **TOOL_CASES[case]}  # fmt: skip
    a, b = both_chat_stream(clients, live_api, **kwargs)
    assert stream_summary(a) == stream_summary(b)
    assert "feedback" in a[-1]


def test_tool_choice_without_tools_is_refused_alike(clients, live_api: LiveApi):
    for client in clients:
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=_models(live_api)[0], messages=HELLO, tool_choice="required")


# ---- unknown and unsupported fields ------------------------------------------------------------------------
def test_unknown_field_is_refused_by_us_and_ignored_by_vllm(clients, live_api: LiveApi):
    ours, theirs = clients
    name = _models(live_api)[0]
    with pytest.raises(openai.BadRequestError) as e:
        ours.chat.completions.create(model=name, messages=HELLO, max_tokens=4, extra_body={"frobnicate": 1})
    assert e.value.body["param"] == "frobnicate"
    # vLLM's server ignores it (a warning in its log): the difference the README table lists
    theirs.chat.completions.create(model=name, messages=HELLO, max_tokens=4, extra_body={"frobnicate": 1})


def test_unsupported_parameter_names_param(clients, live_api: LiveApi):
    ours, _ = clients
    with pytest.raises(openai.BadRequestError) as e:
        ours.chat.completions.create(model=_models(live_api)[0], messages=HELLO, logit_bias={"1": 5})
    assert e.value.body["param"] == "logit_bias"


# ---- /v1/completions and /v1/models ------------------------------------------------------------------------
COMPLETIONS = {
    "greedy": {"temperature": 0, "max_tokens": 10},
    "logprobs": {"temperature": 0, "max_tokens": 5, "logprobs": 2},
    "echo": {"temperature": 0, "max_tokens": 5, "echo": True},
    "n2": {"n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 6},
}


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completions_match_vllm(clients, live_api: LiveApi, case: str):
    ours, theirs = clients
    name = _models(live_api)[0]
    kwargs = {"prompt": "The capital of France is", **COMPLETIONS[case]}
    a = ours.completions.create(model=name, **kwargs).model_dump(exclude_unset=True)
    b = theirs.completions.create(model=name, **kwargs).model_dump(exclude_unset=True)
    assert shape(a) == shape(b)
    assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
    assert [c["finish_reason"] for c in a["choices"]] == [c["finish_reason"] for c in b["choices"]]
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [a["usage"][k] for k in counts] == [b["usage"][k] for k in counts]
    if case == "logprobs":
        assert a["choices"][0]["logprobs"]["tokens"] == b["choices"][0]["logprobs"]["tokens"]
        assert a["choices"][0]["logprobs"]["text_offset"] == b["choices"][0]["logprobs"]["text_offset"]
    record = json.loads(live_api.flush_interactions(a["id"]) or b"{}")
    answer = a["choices"][0]["text"].removeprefix(kwargs["prompt"] if case == "echo" else "")
    assert record["prompt"] == kwargs["prompt"] and record["response"] == answer


def test_completions_stream_match_vllm(clients, live_api: LiveApi):
    ours, theirs = clients
    name = _models(live_api)[0]
    kwargs = {"prompt": "The capital of France is", "temperature": 0, "max_tokens": 8, "logprobs": 1,
              "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    a = [c.model_dump(exclude_unset=True) for c in ours.completions.create(model=name, **kwargs)]
    b = [c.model_dump(exclude_unset=True) for c in theirs.completions.create(model=name, **kwargs)]

    def summary(chunks: list[dict]) -> dict:
        text = "".join(c["text"] for chunk in chunks for c in chunk["choices"])
        choice = {k: v for chunk in chunks for c in chunk["choices"] for k, v in shape(c).items()}
        usage = [shape(chunk["usage"]) for chunk in chunks if chunk.get("usage")]
        return {"text": text, "choice": choice, "usage": usage}

    assert summary(a) == summary(b)
    assert "feedback" in a[-1]


def test_models_list_shape_matches_vllm(clients, live_api: LiveApi):
    ours, theirs = clients
    a, b = ours.models.list().model_dump(), theirs.models.list().model_dump()
    spec = {"id", "object", "created", "owned_by"}
    assert {k for k in a["data"][0] if k in spec} == {k for k in b["data"][0] if k in spec} == spec
    assert a["object"] == b["object"] == "list"
    assert live_api.settings.engine.served_model_name in {m["id"] for m in a["data"]} & {m["id"] for m in b["data"]}


def test_a_completion_can_be_voted_on_and_becomes_a_pairable_event(openai_client, live_api: LiveApi):
    from services.feedback.events import parse_event

    prompt = "Two plus two is"
    answer = openai_client.completions.create(
        model=_models(live_api)[0], prompt=prompt, max_tokens=6, user="voter-parity"
    )
    feedback = answer.model_extra["feedback"]
    assert live_api.flush_interactions(answer.id)
    r = httpx.post(
        live_api.base_url + "/v1/feedback",
        json={**{k: feedback[k] for k in ("completion_id", "token")}, "rating": "like", "user": "voter-parity"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    events = [parse_event(fields) for _, fields in live_api.redis.xrange(live_api.keys.feedback_stream)]
    (event,) = [e for e in events if e.completion_id == answer.id]
    # pairing sees a one-turn conversation whose user turn is the prompt, and the completion's text
    assert event.messages == [{"role": "user", "content": prompt}] and event.response == answer.choices[0].text
