"""The README's settings table is the one the Settings object generates (regenerate: `make readme`)."""

from __future__ import annotations

from pathlib import Path

from services.settings_doc import settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_is_current():
    text = README.read_text()
    start = text.index("<!-- settings:start -->") + len("<!-- settings:start -->")
    end = text.index("<!-- settings:end -->")
    assert text[start:end].strip() == settings_table().strip(), "run `make readme` to regenerate the table"


def test_quickstart_commands_come_first():
    text = README.read_text()
    quick = text[text.index("## Quickstart") :]
    assert quick.index("make up") < quick.index("make test") < quick.index("##", 3)
