"""The README's settings table, generated from the Settings object so the two never drift."""

from __future__ import annotations

import json

from pydantic import BaseModel
from pydantic_settings import BaseSettings

from services.core.config import Settings


def _default(value: object) -> str:
    if isinstance(value, BaseModel):
        return ""
    text = json.dumps(value, default=str)
    return text if len(text) < 60 else text[:57] + "..."


def settings_table(settings_class: type[BaseSettings] = Settings) -> str:
    rows = ["| environment variable | default | what it does |", "| --- | --- | --- |"]
    defaults = settings_class.model_construct()
    for name, field in settings_class.model_fields.items():
        value = getattr(defaults, name, None) if field.default_factory is None else field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            for sub, subfield in type(value).model_fields.items():
                env = f"FEEDLOOP_{name.upper()}__{sub.upper()}"
                rows.append(f"| `{env}` | `{_default(getattr(value, sub))}` | {subfield.description or ''} |")
        else:
            env = "FEEDLOOP_REDIS_URL` / `REDIS_URL" if name == "redis_url" else f"FEEDLOOP_{name.upper()}"
            rows.append(f"| `{env}` | `{_default(field.default)}` | {field.description or ''} |")
    return "\n".join(rows)
