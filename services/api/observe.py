"""HTTP metrics for every request (an ASGI middleware) and the /metrics route."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from services.api.body_limit import ASGIApp, Message, Receive, Scope, Send
from services.core import metrics

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.latest_metrics()
    return Response(body, media_type=content_type)


class RequestMetrics:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            route: Any = scope.get("route")
            metrics.observe_request(getattr(route, "path", None), scope["method"], status, time.perf_counter() - start)
