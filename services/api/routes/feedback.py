"""Feedback on completions: POST a vote, GET the current one, DELETE to withdraw it."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import ORJSONResponse

from services import metrics
from services.api.deps import InteractionsDep, SettingsDep
from services.api.errors import ApiError
from services.config import Settings
from services.schemas import FeedbackRequest, FeedbackWithdrawal
from services.signing import TokenExpired, TokenInvalid, verify
from services.store.feedback import FeedbackStore, VoteOutcome

router = APIRouter()


async def _store(request: Request) -> FeedbackStore:
    return request.app.state.feedback_store


StoreDep = Annotated[FeedbackStore, Depends(_store)]


def _refuse(reason: str, status: int, message: str, **kw: Any) -> ApiError:
    metrics.refuse_feedback(reason)
    return ApiError(status, message, **kw)


def client_ip_hash(request: Request, settings: Settings) -> str:
    ip = request.client.host if request.client else "unknown"
    if settings.api.trust_forwarded_for and (fwd := request.headers.get("x-forwarded-for")):
        ip = fwd.split(",")[0].strip()
    # IPs are personal data: only a keyed hash is stored.
    return hashlib.sha256(f"{settings.feedback.secret}|{ip}".encode()).hexdigest()[:16]


async def authorize(
    completion_id: str,
    token: str,
    user: str | None,
    interactions: InteractionsDep,
    settings: Settings,
    ip_hash: str,
) -> tuple[dict[str, Any], str]:
    """The stored interaction and the voter's identity, or the refusal (404/410/403)."""
    record = await interactions.get(completion_id)
    if record is None:
        expiry = token.partition(".")[0]
        if expiry.isdigit() and int(expiry) < time.time():
            raise _refuse("expired", 410, "This completion's feedback window has closed.", code="expired")
        raise _refuse(
            "unknown",
            404,
            f"No completion '{completion_id}' is known.",
            param="completion_id",
            code="completion_not_found",
        )
    try:
        verify(settings.feedback.secret, token, completion_id, record.get("user"))
    except TokenExpired:
        raise _refuse(
            "expired", 410, "This completion's feedback token has expired.", code="expired"
        ) from None
    except TokenInvalid:
        raise _refuse(
            "bad_token",
            403,
            "The feedback token is not valid for this completion.",
            param="token",
            code="invalid_token",
        ) from None
    owner = record.get("user")
    if owner and user and user != owner:
        raise _refuse(
            "bad_token", 403, "This completion belongs to another user.", param="user", code="user_mismatch"
        )
    return record, owner or user or f"ip:{ip_hash}"


def _rate_limited(outcome: VoteOutcome) -> ApiError:
    retry = max(1, round(outcome.retry_after_s + 0.5))
    return _refuse(
        "rate_limited",
        429,
        f"Too many votes from this {outcome.limited_by}; retry in {retry}s.",
        code="rate_limited",
        headers={"Retry-After": str(retry)},
    )


def _event(
    record: dict[str, Any],
    completion_id: str,
    voter: str,
    ip_hash: str,
    rating: str,
    comment: str | None,
    correction: str | None,
    now: float,
) -> dict[str, Any]:
    return {
        "feedback_id": uuid.uuid4().hex,
        "completion_id": completion_id,
        "user": voter,
        "ip_hash": ip_hash,
        "rating": rating,
        "comment": comment,
        "correction": correction,
        "created_at": now,
        "interaction": {
            "messages": record["messages"],
            "response": record["response"],
            "model": record["model"],
            "adapter": record.get("adapter"),
            "sampling": record.get("sampling", {}),
        },
    }


@router.post("/v1/feedback", status_code=202)
async def post_feedback(
    body: FeedbackRequest,
    request: Request,
    settings: SettingsDep,
    interactions: InteractionsDep,
    store: StoreDep,
) -> Any:
    fb = settings.feedback
    for field, limit in (("comment", fb.max_comment_chars), ("correction", fb.max_correction_chars)):
        if len(getattr(body, field) or "") > limit:
            raise _refuse(
                "too_long",
                413,
                f"'{field}' is longer than {limit} characters.",
                param=field,
                code="field_too_long",
            )
    ip_hash = client_ip_hash(request, settings)
    record, voter = await authorize(
        body.completion_id, body.token, body.user, interactions, settings, ip_hash
    )
    now = time.time()
    state = {"rating": body.rating, "comment": body.comment, "correction": body.correction}
    event = _event(
        record, body.completion_id, voter, ip_hash, body.rating, body.comment, body.correction, now
    )
    outcome = await store.vote(body.completion_id, voter, ip_hash, state, event, now)
    if outcome.status == "rate_limited":
        raise _rate_limited(outcome)
    if outcome.status == "recorded":
        metrics.record_feedback(body.rating, record.get("adapter"))
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
    user: Annotated[str | None, Query(max_length=256)] = None,
) -> Any:
    record = await interactions.get(completion_id)
    if record is None:
        raise ApiError(
            404,
            f"No completion '{completion_id}' is known.",
            param="completion_id",
            code="completion_not_found",
        )
    voter = record.get("user") or user or f"ip:{client_ip_hash(request, settings)}"
    vote = await store.current(completion_id, voter) or {}
    return {
        "completion_id": completion_id,
        "rating": vote.get("rating"),
        "comment": vote.get("comment"),
        "correction": vote.get("correction"),
    }


@router.delete("/v1/feedback/{completion_id}")
async def withdraw_feedback(
    completion_id: str,
    request: Request,
    settings: SettingsDep,
    interactions: InteractionsDep,
    store: StoreDep,
    body: Annotated[FeedbackWithdrawal | None, Body()] = None,
    token: Annotated[str | None, Query(max_length=512)] = None,
    user: Annotated[str | None, Query(max_length=256)] = None,
) -> Any:
    token = body.token if body else token
    user = body.user if body and body.user else user
    if not token:
        raise _refuse(
            "invalid", 422, "A 'token' is required to withdraw a vote.", param="token", code="missing_token"
        )
    ip_hash = client_ip_hash(request, settings)
    record, voter = await authorize(completion_id, token, user, interactions, settings, ip_hash)
    now = time.time()
    event = _event(record, completion_id, voter, ip_hash, "withdrawn", None, None, now)
    outcome = await store.vote(completion_id, voter, ip_hash, None, event, now)
    if outcome.status == "rate_limited":
        raise _rate_limited(outcome)
    if outcome.status == "recorded":
        metrics.record_feedback("withdrawn", record.get("adapter"))
    return {
        "completion_id": completion_id,
        "rating": None,
        "status": "withdrawn" if outcome.status == "recorded" else "unchanged",
    }
