"""Which request fields feedloop honours, and which it refuses by name (never silently ignored)."""

from __future__ import annotations

import pytest

from services.api.schemas import ChatCompletionRequest, CompletionRequest

HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({}, None),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"echo": 0}, "echo"),  # 0 is a value, not an absence
        # null, false and empty values ask for nothing: clients send them by default
        ({"store": False, "metadata": None, "logit_bias": {}, "functions": []}, None),
    ],
)
def test_fields_outside_the_schema_are_named(extra, refused):
    assert ChatCompletionRequest.model_validate({"model": "m", "messages": HELLO, **extra}).unsupported() == refused


def test_honoured_fields_are_not_refused():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": HELLO, "logprobs": True, "top_logprobs": 2, "tool_choice": "auto",
         "tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": False,
         "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    )  # fmt: skip
    assert req.unsupported() is None
    assert req.response_format_dict() == {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "object"}},
    }
    assert req.tools_body()["tool_choice"] == "auto" and req.tools_body()["response_format"]["json_schema"]["schema"]


def test_tool_turns_reach_the_template():
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
    )  # fmt: skip
    _, call, result = req.conversation()
    calls = [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]
    assert call == {"role": "assistant", "content": "", "tool_calls": calls}
    assert result == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


def test_content_may_be_null_only_on_an_assistant_turn():
    for role in ("system", "developer", "user", "tool"):
        with pytest.raises(ValueError, match="content"):
            ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": role, "content": None}]})
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [*HELLO, {"role": "assistant"}]})
    assert req.conversation()[1] == {"role": "assistant", "content": ""}


@pytest.mark.parametrize(("prompt", "refused"), [("a", None), (["a"], None), (["a", "b"], "prompt"), ([], "prompt")])
def test_completions_take_one_prompt(prompt, refused):
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert req.unsupported() == refused
    assert req.max_tokens == 16  # OpenAI's and vLLM's default on this endpoint
