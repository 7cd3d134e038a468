"""The embeddable widget script (services/widget) and, when `api.demo_page` is on, the demo chat page.

The demo page's files belong to the demo (demo/page); they are located as package data, so the product never
imports the demo's code.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WIDGET_DIR = Path(__file__).resolve().parents[2] / "widget"
logger = logging.getLogger(__name__)


def demo_page_dir() -> Path | None:
    try:
        folder = Path(str(importlib.resources.files("demo") / "page"))
    except ModuleNotFoundError:
        return None
    return folder if (folder / "index.html").is_file() else None


def mount(app: FastAPI, demo_page: bool) -> None:
    app.mount("/widget", StaticFiles(directory=WIDGET_DIR), name="widget")
    if not demo_page:
        return
    page_dir = demo_page_dir()
    if page_dir is None:
        logger.warning("api.demo_page is on but the demo's page is not installed; nothing is served at /")
        return

    @app.get("/", include_in_schema=False)
    async def demo_chat_page() -> FileResponse:
        return FileResponse(page_dir / "index.html", media_type="text/html")

    app.mount("/page", StaticFiles(directory=page_dir), name="demo-page")
