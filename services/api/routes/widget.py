"""The widget script and the demo chat page (static files from services/widget)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WIDGET_DIR = Path(__file__).resolve().parent.parent.parent / "widget"


def mount(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def demo_page() -> FileResponse:
        return FileResponse(WIDGET_DIR / "index.html", media_type="text/html")

    app.mount("/widget", StaticFiles(directory=WIDGET_DIR), name="widget")
