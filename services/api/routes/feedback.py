"""Feedback on completions: POST a vote, GET the current one, DELETE to withdraw it."""

from __future__ import annotations

import functools
import hashlib
import time
import uuid
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, Field, ValidationError

from services.api.deps import InteractionsDep, SettingsDep
from services.api.errors import ApiError, json_body, parse_json_body
from services.api.schemas import FeedbackRequest, FeedbackWithdrawal
from services.core import metrics
from services.core.config import Settings
from services.feedback.events import ANONYMOUS_VOTE_FIELD, event_head, voter_identity
from services.feedback.interactions import InteractionLog
from services.feedback.signing import TokenExpired, TokenInvalid, token_expiry, verify
from services.feedback.votes import FeedbackStore, VoteOutcome

router = APIRouter()


async def _store(request: Request) -> FeedbackStore:
    return request.app.state.feedback_store


StoreDep = Annotated[FeedbackStore, Depends(_store)]


def _refuse(reason: str, status: int, message: str, **kw: Any) -> ApiError:
    metrics.refuse_feedback(reason)
    return ApiError(status, message, **kw)


def forwarded_ip(socket_ip: str, forwarded_for: str | None, hops: int) -> str:
    """The client address: with hops trusted proxies appending to X-Forwarded-For, the hops-th entry from
    the right (what the outermost trusted proxy saw); the socket address when hops is 0 or the header has
    fewer entries (entries further left are the client's own claims and never count)."""
    if hops <= 0 or not forwarded_for:
        return socket_ip
    entries = [e.strip() for e in forwarded_for.split(",")]
    entries = [e for e in entries if e]
    return entries[-hops] if len(entries) >= hops else socket_ip


def client_ip_hash(request: Request, settings: Settings) -> str:
    socket_ip = request.client.host if request.client else "unknown"
    ip = forwarded_ip(socket_ip, request.headers.get("x-forwarded-for"), settings.api.trusted_proxy_hops)
    return _ip_hash(settings.feedback.secret, ip)


@functools.lru_cache(maxsize=4096)
def _ip_hash(secret: str, ip: str) -> str:
    # IPs are personal data: only a keyed hash is stored.
    return hashlib.sha256(f"{secret}|{ip}".encode()).hexdigest()[:16]


def _missing(completion_id: str) -> ApiError:
    return _refuse(
        "unknown",
        404,
        f"No completion '{completion_id}' is known.",
        param="completion_id",
        code="completion_not_found",
    )


def _expired(message: str = "This completion's feedback token has expired.") -> ApiError:
    return _refuse("expired", 410, message, code="expired")


def _bad_token(message: str = "The feedback token is not valid for this completion.", param: str = "token") -> ApiError:
    code = "invalid_token" if param == "token" else "user_mismatch"
    return _refuse("bad_token", 403, message, param=param, code=code)


class _Unverified:
    pass


UNVERIFIED = _Unverified()


def token_user(settings: Settings, token: str, completion_id: str, user: str | None) -> str | _Unverified | None:
    """The user the token was issued for, trying the voter's claimed user and then none (cheap HMACs, no
    Redis); UNVERIFIED when neither matches (the stored owner decides then). An expired token is refused."""
    for candidate in (user, None) if user else (None,):
        try:
            verify(settings.feedback.verification_secrets(), token, completion_id, candidate)
        except TokenExpired:
            raise _expired() from None
        except TokenInvalid:
            continue
        return candidate
    return UNVERIFIED


async def stored_record(
    completion_id: str, token: str, user: str | None, interactions: InteractionLog, settings: Settings
) -> dict[str, Any]:
    """The slow path: read the interaction and check the token against its owner (404/410/403)."""
    record = await interactions.get(completion_id)
    if record is None:
        expiry = token_expiry(token)
        if expiry is not None and expiry < time.time():
            raise _expired("This completion's feedback window has closed.")
        raise _missing(completion_id)
    owner: str | None = record.get("user")
    try:
        verify(settings.feedback.verification_secrets(), token, completion_id, owner)
    except TokenExpired:
        raise _expired() from None
    except TokenInvalid:
        raise _bad_token() from None
    # an app's user "app:alice" may be named "alice" by the widget (it does not know the app)
    if owner and user and user != owner and owner.partition(":")[2] != user:
        raise _bad_token("This completion belongs to another user.", param="user")
    return record


async def _vote(
    request: Request,
    completion_id: str,
    token: str,
    user: str | None,
    rating: str,
    state: dict[str, Any] | None,
    comment: str | None = None,
    correction: str | None = None,
) -> VoteOutcome:
    """Check the token and record the vote (state None: withdraw it) in one Redis round trip; raise the
    refusal (404/410/403/429) with nothing written."""
    settings: Settings = request.app.state.settings
    interactions: InteractionLog = request.app.state.interactions
    store: FeedbackStore = request.app.state.feedback_store
    ip_hash = client_ip_hash(request, settings)
    owner = token_user(settings, token, completion_id, user)
    record = interactions.buffered(completion_id)  # None: the vote script reads it from Redis
    if isinstance(owner, _Unverified):  # e.g. the widget did not send the completion's user
        record = await stored_record(completion_id, token, user, interactions, settings)
        owner = record.get("user")
    # Claimed users count only when the token was issued for them: a completion without a user takes one
    # vote (field ANONYMOUS_VOTE_FIELD), cast by the address's identity.
    voter = voter_identity(owner, ip_hash)
    now = time.time()
    head = event_head(uuid.uuid4().hex, completion_id, voter, ip_hash, rating, comment, correction, now)
    outcome = await store.vote(
        completion_id,
        voter,
        ip_hash,
        state,
        head,
        now,
        token_user=owner,
        record=orjson.dumps(record) if record is not None else None,
        field=owner or ANONYMOUS_VOTE_FIELD,
    )
    if outcome.status == "missing":
        raise _missing(completion_id)
    if outcome.status == "bad_token":
        raise _bad_token()
    if outcome.status == "rate_limited":
        retry = max(1, round(outcome.retry_after_s + 0.5))
        raise _refuse(
            "rate_limited",
            429,
            f"Too many votes from this {outcome.limited_by}; retry in {retry}s.",
            code="rate_limited",
            headers={"Retry-After": str(retry)},
        )
    if outcome.status == "recorded":
        metrics.record_feedback(rating, outcome.adapter, outcome.app)
    return outcome


@router.post("/v1/feedback", status_code=202, openapi_extra=json_body(FeedbackRequest))
async def post_feedback(request: Request) -> Any:
    # The hottest route: the body is validated by pydantic-core straight from the bytes, skipping
    # FastAPI's body-parameter machinery (a large share of a vote's CPU); errors read the same.
    body = parse_json_body(FeedbackRequest, await request.body())
    fb = request.app.state.settings.feedback
    for field, limit in (("comment", fb.max_comment_chars), ("correction", fb.max_correction_chars)):
        if len(getattr(body, field) or "") > limit:
            raise _refuse(
                "too_long",
                413,
                f"'{field}' is longer than {limit} characters.",
                param=field,
                code="field_too_long",
            )
    state = {"rating": body.rating, "comment": body.comment, "correction": body.correction}
    outcome = await _vote(
        request, body.completion_id, body.token, body.user, body.rating, state, body.comment, body.correction
    )
    return ORJSONResponse(
        {"completion_id": body.completion_id, "rating": body.rating, "status": outcome.status},
        status_code=202,
    )


@router.get("/v1/feedback/{completion_id}")
async def get_feedback(
    completion_id: str,
    request: Request,
    settings: SettingsDep,
    interactions: InteractionsDep,
    store: StoreDep,
    token: Annotated[str, Query(min_length=1, max_length=512, description="The completion's feedback token")],
    user: Annotated[str | None, Query(max_length=256)] = None,
) -> Any:
    """The current vote on a completion; the completion's token is required (its comment and correction
    are the voter's own)."""
    record = await stored_record(completion_id, token, user, interactions, settings)
    vote = await store.current(completion_id, record.get("user") or ANONYMOUS_VOTE_FIELD) or {}
    return {
        "completion_id": completion_id,
        "rating": vote.get("rating"),
        "comment": vote.get("comment"),
        "correction": vote.get("correction"),
    }


# DELETE takes the token in the query (documented, as on GET) or, as the widget sends it, in a JSON body
# (FeedbackWithdrawal; its values win). OpenAPI cannot say "one of the two", so the query's token is the
# documented requirement and the body an alternative: every request the schema allows is one the route takes.
_WITHDRAW_DOC: dict[str, Any] = {
    "parameters": [
        {
            "name": "token",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "minLength": 1, "maxLength": 512},
            "description": "The completion's feedback token (or `token` in a JSON body)",
        },
        {"name": "user", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 256}},
    ],
    "requestBody": {
        "required": False,
        "description": "Alternatively, the token (and user) as a JSON body: the widget's form",
        "content": {"application/json": {"schema": FeedbackWithdrawal.model_json_schema()}},
    },
}


class _WithdrawalQuery(BaseModel):
    token: str = Field(min_length=1, max_length=512)
    user: str | None = Field(None, max_length=256)


def _withdrawal(raw: bytes, query: dict[str, str]) -> FeedbackWithdrawal | _WithdrawalQuery:
    if raw.strip() not in (b"", b"null"):
        return parse_json_body(FeedbackWithdrawal, raw)
    if "token" not in query:
        raise _refuse("invalid", 422, "A 'token' is required to withdraw a vote.", param="token", code="missing_token")
    try:
        return _WithdrawalQuery.model_validate({k: v for k, v in query.items() if k in ("token", "user")})
    except ValidationError as error:
        errors = [{**e, "loc": ("query", *e["loc"])} for e in error.errors(include_url=False)]
        raise RequestValidationError(errors) from None


@router.delete("/v1/feedback/{completion_id}", openapi_extra=_WITHDRAW_DOC)
async def withdraw_feedback(completion_id: str, request: Request) -> Any:
    given = _withdrawal(await request.body(), dict(request.query_params))
    user = given.user or request.query_params.get("user")
    outcome = await _vote(request, completion_id, given.token, user, "withdrawn", None)
    return {
        "completion_id": completion_id,
        "rating": None,
        "status": "withdrawn" if outcome.status == "recorded" else "unchanged",
    }
