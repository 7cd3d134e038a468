"""What the chat and the text-completion routes share: refusing unsupported fields, resolving the model name,
building vLLM's sampling parameters, the feedback token, and the caller's app on the interaction record."""

from __future__ import annotations

from typing import Any

from services.api.auth import Caller
from services.api.errors import ApiError
from services.core.config import Settings
from services.engine.engine import Engine, Resolved, UnknownModel
from services.feedback.signing import sign


def reject_unsupported(req: Any) -> None:
    """400 naming the first field this server does not implement: nothing is silently ignored."""
    unsupported = req.unsupported()
    if unsupported is not None:
        raise ApiError(
            400, f"Unsupported parameter: '{unsupported}' is not supported by this server.",
            param=unsupported, code="unsupported_parameter",
        )  # fmt: skip


def resolve_model(engine: Engine, name: str) -> Resolved:
    try:
        return engine.resolve(name)
    except UnknownModel:
        raise ApiError(404, f"The model '{name}' does not exist.", param="model", code="model_not_found") from None


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
