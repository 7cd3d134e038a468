"""POST /v1/chat/completions: OpenAI-compatible, streaming and not, on the in-process engine."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter
from fastapi.responses import ORJSONResponse, StreamingResponse

from services.api.deps import EngineDep, InteractionsDep, SettingsDep
from services.api.errors import ApiError
from services.api.schemas import ChatCompletionRequest
from services.core import metrics
from services.core.config import Settings
from services.engine.engine import Engine, Resolved, UnknownModel
from services.feedback.events import interaction_record
from services.feedback.signing import sign

router = APIRouter()


class Prepared:
    """A validated request: its id, resolved model, prompt tokens and sampling parameters."""

    def __init__(self, req: ChatCompletionRequest, engine: Engine, settings: Settings):
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import RequestOutputKind

        if not req.messages:
            raise ApiError(
                400, "'messages' must contain at least one message.", param="messages", code="empty_messages"
            )
        try:
            self.target: Resolved = engine.resolve(req.model)
        except UnknownModel:
            raise ApiError(
                404, f"The model '{req.model}' does not exist.", param="model", code="model_not_found"
            ) from None
        self.req = req
        self.conversation = req.conversation()
        self.prompt_ids = engine.render(self.conversation)
        room = engine.max_model_len - len(self.prompt_ids)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if room <= 0 or (max_tokens is not None and max_tokens > room):
            raise ApiError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
                f"{len(self.prompt_ids) + (max_tokens or 0)} tokens ({len(self.prompt_ids)} in the messages, "
                f"{max_tokens or 0} in the completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        self.max_tokens = max_tokens or min(settings.engine.default_max_tokens, room)
        try:
            self.params = SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k if req.top_k is not None else 0,
                max_tokens=self.max_tokens,
                min_tokens=req.min_tokens or 0,
                stop=req.stop,
                seed=req.seed,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                ignore_eos=req.ignore_eos,
                output_kind=RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY,
            )
        except (VLLMValidationError, ValueError) as e:
            raise ApiError(400, str(e), code="invalid_sampling_parameters") from None
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.started = time.perf_counter()
        self.created = int(time.time())

    def feedback(self, settings: Settings) -> dict[str, Any]:
        expires_at = self.created + settings.feedback.token_ttl_s
        token = sign(settings.feedback.secret, self.id, self.req.user, expires_at)
        return {"completion_id": self.id, "token": token, "expires_at": expires_at}

    def record(
        self,
        texts: list[str],
        finish_reasons: list[str | None],
        usage: dict[str, int],
        feedback: dict[str, Any],
    ) -> dict[str, Any]:
        return interaction_record(
            self.id,
            self.conversation,
            texts,
            finish_reasons,
            model=self.req.model,
            adapter=self.target.adapter_name,
            sampling=self.req.sampling(),
            user=self.req.user,
            usage=usage,
            created_at=self.created,
            finished_at=time.time(),
            expires_at=feedback["expires_at"],
        )


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, engine: EngineDep, settings: SettingsDep, interactions: InteractionsDep
) -> Any:
    p = Prepared(req, engine, settings)
    if req.stream:
        return StreamingResponse(
            _stream(p, engine, settings, interactions),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts = [""] * req.n
    reasons: list[str | None] = [None] * req.n
    completion_tokens = 0
    async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
        for o in out.outputs:
            texts[o.index] += o.text
            reasons[o.index] = o.finish_reason
            completion_tokens += len(o.token_ids)
    usage = _usage(len(p.prompt_ids), completion_tokens)
    metrics.observe_tokens(req.model, usage["prompt_tokens"], completion_tokens)
    feedback = p.feedback(settings)
    interactions.record(p.record(texts, reasons, usage, feedback))
    return ORJSONResponse(
        {
            "id": p.id,
            "object": "chat.completion",
            "created": p.created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": None,
                    "finish_reason": _finish(reasons[i]),
                }
                for i in range(req.n)
            ],
            "usage": usage,
            "system_fingerprint": p.target.adapter_name or engine.base_name,
            "feedback": feedback,
        }
    )


async def _stream(
    p: Prepared, engine: Engine, settings: Settings, interactions: InteractionsDep
) -> AsyncIterator[bytes]:
    n = p.req.n
    head = {
        "id": p.id,
        "object": "chat.completion.chunk",
        "created": p.created,
        "model": p.req.model,
        "system_fingerprint": p.target.adapter_name or engine.base_name,
    }
    texts = [""] * n
    reasons: list[str | None] = [None] * n
    started = [False] * n
    completion_tokens = 0
    first = True
    metrics.ACTIVE_STREAMS.inc()
    try:
        # A client that disconnects cancels this generator; engine.generate then aborts the request.
        async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
            if first:
                first = False
                metrics.TIME_TO_FIRST_TOKEN.labels(p.req.model).observe(time.perf_counter() - p.started)
            chunk = _chunk(out, head, texts, reasons, started)
            completion_tokens += chunk[1]
            if chunk[0]:
                yield chunk[0]
    finally:
        metrics.ACTIVE_STREAMS.dec()
    usage = _usage(len(p.prompt_ids), completion_tokens)
    metrics.observe_tokens(p.req.model, usage["prompt_tokens"], completion_tokens)
    feedback = p.feedback(settings)
    interactions.record(p.record(texts, reasons, usage, feedback))
    last: dict[str, Any] = {**head, "choices": [], "feedback": feedback}
    if p.req.stream_options and p.req.stream_options.include_usage:
        last["usage"] = usage
    yield b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"


def _chunk(
    out: Any, head: dict[str, Any], texts: list[str], reasons: list[str | None], started: list[bool]
) -> tuple[bytes, int]:
    """The SSE events for an engine output, one per choice as OpenAI sends them (empty if it carries
    nothing), and its token count. vLLM merges the choices of n > 1 into one output when the reader lags."""
    tokens = 0
    events = []
    for o in out.outputs:
        i = o.index
        delta: dict[str, str] = {"content": o.text}
        if not started[i]:
            started[i] = True
            delta["role"] = "assistant"
        texts[i] += o.text
        tokens += len(o.token_ids)
        reasons[i] = o.finish_reason
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": _finish(o.finish_reason)}
        events.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
    return b"".join(events), tokens


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")
