"""The test chat template with tools renders every tool-free conversation exactly as the tiny model's own
template, so serving the shared test API with it changes nothing for the other tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from demo.tinymodel import CHAT_TEMPLATE

TEMPLATE = Path(__file__).resolve().parents[2] / "support" / "tool_chat_template.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def render(template: str, **context: object) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    env.filters["tojson"] = lambda v, **_: __import__("json").dumps(v)
    return env.from_string(template).render(**context)


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ],
)
def test_without_tools_it_renders_like_the_tiny_template(messages, generation_prompt):
    ours = render(TEMPLATE.read_text(), messages=messages, add_generation_prompt=generation_prompt)
    assert ours == render(CHAT_TEMPLATE, messages=messages, add_generation_prompt=generation_prompt)


def test_tools_and_tool_turns_are_rendered():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "x", "content": "sunny"},
    ]  # fmt: skip
    text = render(TEMPLATE.read_text(), messages=messages, tools=[WEATHER], add_generation_prompt=True)
    assert '"name": "get_weather"' in text.split("<|user|>")[0]  # the tools, in the system turn
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>sunny</tool_response>" in text and text.endswith("<|assistant|>\n")
