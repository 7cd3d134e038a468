"""The embeddable widget stays small and dependency-free: it is one file, served as is."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WIDGET_DIR = ROOT / "services" / "widget"
PAGE_DIR = ROOT / "demo" / "page"
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
    html = (PAGE_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="(widget|page)/([^"]+)"', html)
    assert refs
    for folder, ref in refs:
        assert ((WIDGET_DIR if folder == "widget" else PAGE_DIR) / ref).is_file(), ref
