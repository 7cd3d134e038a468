"""One tool definition and the tool-rendering chat template, shared by the tool-calling tests."""

from __future__ import annotations

from pathlib import Path

TOOL_TEMPLATE = Path(__file__).resolve().parent / "tool_chat_template.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
