"""The published OpenAPI schema says exactly which requests are accepted (issue 14, item 8): a body the schema
allows is one the server takes, a body it refuses is refused (checked against the schema FastAPI serves, as
schemathesis reads it); a 405 names the methods the schema lists."""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from services.api.app import create_app
from services.api.schemas import SEED_MAX, ChatCompletionRequest, CompletionRequest
from services.core.config import Settings

HELLO = [{"role": "user", "content": "hi"}]


@cache
def openapi() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def schema_accepts(component: str, body: dict[str, Any]) -> bool:
    doc = openapi()
    root = {**doc["components"]["schemas"][component], "components": doc["components"]}
    return jsonschema.Draft202012Validator(root).is_valid(body)


def model_accepts(model: type[ChatCompletionRequest] | type[CompletionRequest], body: dict[str, Any]) -> bool:
    """What the request model lets through to the route: validation, then the unsupported-field check."""
    try:
        return model.model_validate(body).unsupported() is None
    except ValidationError:
        return False


@pytest.mark.parametrize(
    ("extra", "accepted"),
    [
        ({}, True),
        # fields outside the schema: accepted only when they ask for nothing
        ({"store": False, "metadata": None, "logit_bias": {}, "functions": [], "suffix": ""}, True),
        ({"logit_bias": {"1": 5}}, False),
        ({"frobnicate": 1}, False),
        ({"store": True}, False),
        # content may be null (or absent) only on an assistant turn
        ({"messages": [{"role": "user", "content": None}]}, False),
        ({"messages": [{"role": "tool", "tool_call_id": "c1"}]}, False),
        ({"messages": [*HELLO, {"role": "assistant", "content": None}]}, True),
        ({"messages": [*HELLO, {"role": "assistant"}]}, True),
        ({"messages": [{"role": "robot", "content": "hi"}]}, False),
        # JSON's types: a boolean is not a number, a number not a boolean
        ({"temperature": False}, False),
        ({"seed": True}, False),
        ({"stream": 0}, False),
        ({"stream_options": {"include_usage": 1}}, False),
        ({"n": 2, "temperature": 1}, True),
        # a seed every JSON client holds exactly
        ({"seed": SEED_MAX}, True),
        ({"seed": -SEED_MAX}, True),
        ({"seed": SEED_MAX + 1}, False),
        # stop sequences: at most 4, none empty
        ({"stop": ["a", "b", "c", "d"]}, True),
        ({"stop": ["a", "b", "c", "d", "e"]}, False),
        ({"stop": ""}, False),
        ({"stop": ["a", ""]}, False),
        ({"top_k": -1}, True),
        ({"top_k": -2}, False),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, False),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}}}}, True),
    ],
)
def test_chat_schema_and_model_agree(extra: dict[str, Any], accepted: bool):
    body = {"model": "m", "messages": HELLO, **extra}
    assert schema_accepts("ChatCompletionRequest", body) is accepted
    assert model_accepts(ChatCompletionRequest, body) is accepted


@pytest.mark.parametrize(
    "extra",
    [
        {"top_logprobs": 2},  # needs logprobs: true (the route: 400 invalid_logprobs)
        {"top_logprobs": 2, "logprobs": False},
        {"response_format": {"type": "json_schema"}},  # needs its json_schema (the route: 400)
        {"tools": []},  # vLLM: 400 invalid_tools
        {"tools": [{"type": "function"}]},
        {"tool_choice": "auto"},  # a tool_choice needs tools (vLLM: 400)
        {"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
        {"n": 2, "temperature": 0},  # greedy sampling makes one answer (vLLM: 400)
    ],
)
def test_chat_schema_states_the_routes_own_rules(extra: dict[str, Any]):
    """Rules the route (or vLLM behind it) checks with a 400 are in the schema too."""
    assert not schema_accepts("ChatCompletionRequest", {"model": "m", "messages": HELLO, **extra})


def test_chat_schema_accepts_what_those_rules_allow():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in (
        {"top_logprobs": 2, "logprobs": True},
        {"top_logprobs": 0},
        {"tools": tools, "tool_choice": "none"},
        {"tools": tools, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"n": 2, "temperature": 0.5},
    ):
        assert schema_accepts("ChatCompletionRequest", {"model": "m", "messages": HELLO, **extra}), extra


@pytest.mark.parametrize(
    ("prompt", "accepted"), [("a", True), (["a"], True), ("", False), ([], False), (["a", "b"], False), ([""], False)]
)
def test_completions_schema_says_one_prompt(prompt: Any, accepted: bool):
    assert schema_accepts("CompletionRequest", {"model": "m", "prompt": prompt}) is accepted
    if prompt != "" and prompt != [""]:  # an empty prompt is refused by the route (400 empty_prompt)
        assert model_accepts(CompletionRequest, {"model": "m", "prompt": prompt}) is accepted


def test_completions_schema_states_greedy_sampling_makes_one_answer():
    assert not schema_accepts("CompletionRequest", {"model": "m", "prompt": "a", "n": 2, "temperature": 0})
    assert schema_accepts("CompletionRequest", {"model": "m", "prompt": "a", "n": 2, "temperature": 0.7})


def test_published_seed_bounds_are_exact():
    """FastAPI writes bounds as floats: the published bounds must read back as the validated ones."""
    seed = openapi()["components"]["schemas"]["ChatCompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert int(seed["maximum"]) == SEED_MAX and int(seed["minimum"]) == -SEED_MAX
    assert str(int(float(repr(seed["maximum"])))) == str(SEED_MAX)


def test_withdrawal_documents_the_token_it_needs():
    delete = openapi()["paths"]["/v1/feedback/{completion_id}"]["delete"]
    params = {p["name"]: p for p in delete["parameters"]}
    assert params["token"]["in"] == "query" and params["token"]["required"] is True
    assert delete["requestBody"]["required"] is False


@pytest.mark.parametrize(
    ("method", "path", "documented", "allow"),
    [
        ("OPTIONS", "/v1/feedback/some-id", "/v1/feedback/{completion_id}", "DELETE, GET"),
        ("PUT", "/v1/feedback/some-id", "/v1/feedback/{completion_id}", "DELETE, GET"),
        ("GET", "/v1/chat/completions", "/v1/chat/completions", "POST"),
        # a concrete path is its own resource, not an instance of /admin/adapters/{version}
        ("OPTIONS", "/admin/adapters/pin", "/admin/adapters/pin", "DELETE"),
        ("PATCH", "/admin/adapters", "/admin/adapters", "GET, POST"),
    ],
)
def test_405_names_the_methods_the_schema_lists(method: str, path: str, documented: str, allow: str):
    response = TestClient(create_app(Settings())).request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert set(allow.split(", ")) == {m.upper() for m in openapi()["paths"][documented]}
