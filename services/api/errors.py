"""OpenAI's error body for every error the API returns."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from services.core import metrics

log = logging.getLogger(__name__)

STORE_RETRY_AFTER_S = 5  # Retry-After of a 503 answered while Redis is unreachable

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    410: "expired_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: every 4xx and 5xx the API answers has this shape."""

    error: ErrorDetail


_STATUS_DOC = {
    400: "Bad request (malformed JSON, a value the model cannot take, a context too long)",
    401: "A valid API key is required",
    403: "The token or key does not allow this",
    404: "Unknown model, completion or route",
    409: "Conflicts with the current state",
    410: "The completion's feedback window has closed",
    413: "Body or field too large",
    422: "A field is missing or has the wrong type or range",
    429: "Rate limited (see Retry-After)",
    503: "A dependency (Redis) is unavailable (see Retry-After)",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` documenting these error statuses with OpenAI's error body."""
    return {status: {"model": ErrorResponse, "description": _STATUS_DOC[status]} for status in statuses}


class ApiError(Exception):
    """Raise anywhere in a route: becomes {"error": {...}} with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers


def error_body(
    status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": type or _TYPE_BY_STATUS.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(err: ApiError) -> ORJSONResponse:
    metrics.API_ERRORS.labels(err.type).inc()
    return ORJSONResponse(
        error_body(err.status, err.message, type=err.type, param=err.param, code=err.code),
        status_code=err.status,
        headers=err.headers,
    )


def _validation_response(exc: RequestValidationError) -> ORJSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(
            ApiError(
                400,
                f"Malformed JSON body: {first.get('ctx', {}).get('error', '')}".strip(),
                code="invalid_json",
            )
        )
    loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query", "path")]
    param = ".".join(loc) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors[:5]
    )
    return error_response(ApiError(422, message, param=param, code="invalid_value"))


ModelT = TypeVar("ModelT", bound=BaseModel)


def parse_json_body(model: type[ModelT], raw: bytes) -> ModelT:
    """Validate a JSON body as FastAPI would for a body parameter, with the same error responses."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra documenting a body that a route parses itself with parse_json_body."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> ORJSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        return _validation_response(exc)

    @app.exception_handler(RedisError)
    async def _store_down(_: Request, exc: RedisError) -> ORJSONResponse:
        # Redis unreachable, timing out or refusing writes: nothing was recorded; the client may retry.
        log.warning("a request failed on Redis: %s: %s", type(exc).__name__, exc)
        return error_response(
            ApiError(
                503,
                "The feedback store is unavailable right now; nothing was recorded. Retry shortly.",
                code="store_unavailable",
                headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first matching route's methods
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(ApiError(exc.status_code, str(exc.detail), headers=headers))


def allowed_methods(request: Request) -> list[str]:
    """The methods served at this request's path (the `Allow` header of a 405): those of every route with the
    path of the first route that matches it, as the schema lists them (a concrete path such as
    /admin/adapters/pin is its own resource, not an instance of /admin/adapters/{version})."""
    methods: set[str] = set()
    path = None
    for route in request.app.router.routes:
        route_methods = getattr(route, "methods", None)
        if not route_methods or route.matches(request.scope)[0] == Match.NONE:
            continue
        path = path or getattr(route, "path", None)
        if getattr(route, "path", None) == path:
            methods |= route_methods
    return sorted(methods)
