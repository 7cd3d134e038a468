"""The README's settings table is the one the Settings object generates (regenerate: `make readme`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.settings import DemoSettings
from services.core.settings_doc import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("block", ["settings", "demo-settings"])
def test_settings_tables_are_current(block: str) -> None:
    expected = settings_table() if block == "settings" else settings_table(DemoSettings)
    text = README.read_text()
    start = text.index(f"<!-- {block}:start -->") + len(f"<!-- {block}:start -->")
    end = text.index(f"<!-- {block}:end -->")
    assert text[start:end].strip() == expected.strip(), "run `make readme` to regenerate the table"


def test_quickstart_commands_come_first():
    text = README.read_text()
    quick = text[text.index("## Quickstart") :]
    assert quick.index("make up") < quick.index("make test") < quick.index("##", 3)
