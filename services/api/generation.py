"""What the chat and the text-completion routes share: refusing unsupported fields, resolving the model name
(and routing the canary's users), counting the canary's answers, building vLLM's sampling parameters, the
feedback token, and the caller's app on the interaction record."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from fastapi import Request

from services.adapters.canary import routes_to_canary
from services.adapters.canary_health import record_answer
from services.api.auth import Caller
from services.api.errors import ApiError
from services.core import metrics
from services.core.config import Settings
from services.core.repetition import degenerate
from services.engine.engine import Engine, Resolved, UnknownModel
from services.feedback.signing import sign

log = logging.getLogger(__name__)


def reject_unsupported(req: Any) -> None:
    """400 naming the first field this server does not implement: nothing is silently ignored."""
    unsupported = req.unsupported()
    if unsupported is not None:
        raise ApiError(
            400, f"Unsupported parameter: '{unsupported}' is not supported by this server.",
            param=unsupported, code="unsupported_parameter",
        )  # fmt: skip


def resolve_model(
    engine: Engine,
    name: str,
    user: str | None = None,
    canary: tuple[str, float] | None = None,
    alias: str | None = None,
) -> Resolved:
    """What the model name serves now. A request naming the alias goes to the running canary when its user
    falls in the canary's share (services/adapters/canary.py, sticky per app-namespaced user); a request
    naming a version is never rerouted."""
    try:
        target = engine.resolve(name)
    except UnknownModel:
        raise ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found") from None
    if canary is not None and name == alias and routes_to_canary(canary[0], canary[1], user):
        with contextlib.suppress(UnknownModel):  # unloaded a moment ago: the alias serves
            return Resolved(name, engine.resolve(canary[0]).adapter, canary=True)
    return target


class CanaryWatch:
    """Counts the answers of a request routed to the canary (its hard-failure signal); a no-op otherwise."""

    def __init__(self, request: Request, target: Resolved, settings: Settings, tokenizer: Any) -> None:
        self.version = target.adapter_name if target.canary else None
        self.state = request.app.state
        self.min_ratio = settings.gate.smoke_min_distinct_ratio
        self.tokenizer = tokenizer

    async def answered(self, texts: list[str]) -> None:
        if self.version is None:
            return
        bad = any(degenerate(t, self.tokenizer.encode(t, add_special_tokens=False), self.min_ratio) for t in texts)
        await self._count("degenerate" if bad else "ok")

    async def failed(self) -> None:
        if self.version is not None:
            await self._count("error")

    async def _count(self, outcome: str) -> None:
        metrics.CANARY_ANSWERS.labels(outcome).inc()
        assert self.version is not None
        try:
            await record_answer(self.state.redis, self.state.keys, self.version, outcome)
        except Exception as error:  # Redis trouble never fails the answer
            log.warning("could not count a canary answer: %s", error)


def sampling_params(req: Any, max_tokens: int, **specific: Any) -> Any:
    """vLLM's SamplingParams from the fields both routes share, plus the route's own (logprobs, structured
    outputs, ...); a value vLLM refuses is a 400."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k if req.top_k is not None else 0,
            max_tokens=max_tokens,
            min_tokens=req.min_tokens or 0,
            stop=req.stop,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            ignore_eos=req.ignore_eos,
            output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
            **specific,
        )
    except (VLLMValidationError, ValueError) as e:
        raise ApiError(400, str(e), code="invalid_sampling_parameters") from None


def feedback_token(settings: Settings, completion_id: str, user: str | None, created: int) -> dict[str, Any]:
    """The `feedback` object of a response: what the widget needs to vote on this completion."""
    expires_at = created + settings.feedback.token_ttl_s
    token = sign(settings.feedback.secret, completion_id, user, expires_at)
    return {"completion_id": completion_id, "token": token, "expires_at": expires_at}


def add_caller(record: dict[str, Any], caller: Caller) -> None:
    """The app whose key made the request; the vote script reads the app's vote quota from the record."""
    if caller.app is not None:
        record["app"] = caller.app
        record["vote_rate"] = caller.vote_rate


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")
