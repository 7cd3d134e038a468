"""The embeddable widget stays small and dependency-free: it is one file, served as is."""

from __future__ import annotations

import re
from pathlib import Path

WIDGET_DIR = Path(__file__).resolve().parents[2] / "services" / "widget"
WIDGET = WIDGET_DIR / "feedloop.js"


def test_widget_is_under_10_kb() -> None:
    size = WIDGET.stat().st_size
    assert size < 10_000, f"feedloop.js is {size} bytes; keep it under 10 KB"


def test_widget_loads_nothing_else() -> None:
    source = WIDGET.read_text()
    assert not re.search(r"\bimport\b\s*[({\"']|\brequire\(", source)
    assert "http://" not in source and "https://" not in source
    assert 'credentials: "omit"' in source


def test_demo_page_references_files_that_exist() -> None:
    html = (WIDGET_DIR / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="widget/([^"]+)"', html):
        assert (WIDGET_DIR / ref).is_file(), ref
