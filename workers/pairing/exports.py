"""Reading a dataset version's exports (JSONL in TRL's conversational format) back into rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ExportError(ValueError):
    """An export file is not what the exporter writes."""


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ExportError(f"{path}:{number} is not JSON: {error}") from error
    return rows


_TOOL_KEYS = ("tool_calls", "tool_call_id")


def _messages(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ExportError(f"{where}: expected a list of chat messages")
    messages: list[dict[str, Any]] = []
    for m in value:
        message: dict[str, Any] = {"role": str(m["role"]), "content": str(m.get("content") or "")}
        for key in _TOOL_KEYS:  # a tool-calling turn keeps what the chat template renders of it
            if m.get(key):
                message[key] = m[key]
        if "tool_calls" in message and not (
            isinstance(message["tool_calls"], list)
            and all(isinstance(c, dict) and "function" in c for c in message["tool_calls"])
        ):
            raise ExportError(f"{where}: tool_calls must be a list of {{type, function: {{name, arguments}}}}")
        messages.append(message)
    return messages


def _tools(row: dict[str, Any], where: str) -> dict[str, Any]:
    """{"tools": [...]} when the row has tool definitions (TRL passes them to the chat template), else {}."""
    tools = row.get("tools")
    if not tools:
        return {}
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise ExportError(f"{where}: tools must be a list of tool definitions")
    return {"tools": tools}


def load_preference_rows(path: Path) -> list[dict[str, Any]]:
    """DPO rows {prompt, chosen, rejected} as lists of messages, and "tools" where a row has them (extra keys
    such as pair_id dropped)."""
    return [
        {
            **{key: _messages(row.get(key), f"{path}:{index}:{key}") for key in ("prompt", "chosen", "rejected")},
            **_tools(row, f"{path}:{index}"),
        }
        for index, row in enumerate(read_jsonl(path), 1)
    ]


def load_kto_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for index, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("label"), bool):
            raise ExportError(f"{path}:{index}: label must be true or false")
        rows.append(
            {
                "prompt": _messages(row.get("prompt"), f"{path}:{index}:prompt"),
                "completion": _messages(row.get("completion"), f"{path}:{index}:completion"),
                "label": row["label"],
                **_tools(row, f"{path}:{index}"),
            }
        )
    return rows
