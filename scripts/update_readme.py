"""Regenerate the settings tables in README.md: the product's Settings and the demo's own settings."""

from pathlib import Path

from demo.settings import DemoSettings
from services.core.settings_doc import settings_table

TABLES = {"settings": settings_table(), "demo-settings": settings_table(DemoSettings)}


def replace_block(text: str, name: str, body: str) -> str:
    head, rest = text.split(f"<!-- {name}:start -->", 1)
    _, tail = rest.split(f"<!-- {name}:end -->", 1)
    return f"{head}<!-- {name}:start -->\n{body}\n<!-- {name}:end -->{tail}"


if __name__ == "__main__":
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    for name, body in TABLES.items():
        text = replace_block(text, name, body)
    readme.write_text(text)
