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


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise ExportError(f"{where}: expected a list of chat messages")
    return [{"role": str(m["role"]), "content": str(m.get("content") or "")} for m in value]


def load_preference_rows(path: Path) -> list[dict[str, Any]]:
    """DPO rows {prompt, chosen, rejected} as lists of messages (extra keys such as pair_id dropped)."""
    return [
        {key: _messages(row.get(key), f"{path}:{index}:{key}") for key in ("prompt", "chosen", "rejected")}
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
            }
        )
    return rows
