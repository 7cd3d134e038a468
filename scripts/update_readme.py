"""Regenerate the settings table in README.md from the Settings object."""

from pathlib import Path

from services.settings_doc import settings_table

readme = Path(__file__).resolve().parent.parent / "README.md"
text = readme.read_text()
head, rest = text.split("<!-- settings:start -->", 1)
_, tail = rest.split("<!-- settings:end -->", 1)
readme.write_text(f"{head}<!-- settings:start -->\n{settings_table()}\n<!-- settings:end -->{tail}")
