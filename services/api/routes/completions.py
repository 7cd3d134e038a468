"""POST /v1/completions: the plain-prompt endpoint (OpenAI's legacy completions, as vLLM's server serves it).

Same engine path as chat (adapter routing, interaction log, feedback token, adapter version in
``system_fingerprint``); the prompt is tokenized as vLLM's server does (with the tokenizer's special tokens)
and no chat template is applied. The interaction is logged with the prompt text (``prompt``) and, so that
votes and pairing treat it like any answer, as a one-message conversation (``messages``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse, StreamingResponse

from services.api import vllm_compat
from services.api.auth import ANONYMOUS, Caller, CallerDep, namespaced_user, take_chat_quota
from services.api.deps import CanaryDep, EngineDep, InteractionsDep, SettingsDep
from services.api.errors import ApiError
from services.api.generation import (
    CanaryWatch,
    add_caller,
    feedback_token,
    finish_reason,
    reject_unsupported,
    resolve_model,
    sampling_params,
    usage_counts,
)
from services.api.schemas import CompletionRequest
from services.core import metrics
from services.core.config import Settings
from services.engine.engine import Engine, Resolved
from services.feedback.events import interaction_record
from services.feedback.interactions import InteractionLog

router = APIRouter()


class PreparedCompletion:
    def __init__(
        self,
        req: CompletionRequest,
        engine: Engine,
        settings: Settings,
        canary: tuple[str, float] | None = None,
    ):
        reject_unsupported(req)
        self.target: Resolved = resolve_model(engine, req.model, req.user, canary, settings.engine.alias)
        self.req = req
        self.prompt = req.prompt_text()
        self.prompt_ids = list(engine.tokenizer.encode(self.prompt))
        if not self.prompt_ids:
            raise ApiError(400, "'prompt' must not be empty.", param="prompt", code="empty_prompt")
        room = engine.max_model_len - len(self.prompt_ids)
        if room <= 0 or req.max_tokens > room:
            raise ApiError(
                400,
                f"This model's maximum context length is {engine.max_model_len} tokens. However, you requested "
                f"{len(self.prompt_ids) + req.max_tokens} tokens ({len(self.prompt_ids)} in the prompt, "
                f"{req.max_tokens} in the completion). Please reduce the length of the prompt or completion.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        self.params = sampling_params(
            req,
            req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
            structured_outputs=vllm_compat.structured_outputs(
                req.response_format.model_dump(by_alias=True) if req.response_format else None
            ),
        )
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.started = time.perf_counter()
        self.created = int(time.time())
        self.fingerprint = self.target.adapter_name or engine.base_name

    caller: Caller = ANONYMOUS  # set by the route: the app whose key made the request

    def feedback(self, settings: Settings) -> dict[str, Any]:
        return feedback_token(settings, self.id, self.req.user, self.created)

    def record(
        self, texts: list[str], reasons: list[str | None], usage: dict[str, int], feedback: dict[str, Any]
    ) -> dict[str, Any]:
        record = interaction_record(
            self.id,
            [{"role": "user", "content": self.prompt}],
            texts,
            reasons,
            model=self.req.model,
            adapter=self.target.adapter_name,
            sampling=self.req.sampling(),
            user=self.req.user,
            usage=usage,
            created_at=self.created,
            finished_at=time.time(),
            expires_at=feedback["expires_at"],
        )
        record["prompt"] = self.prompt
        record["endpoint"] = "completions"
        add_caller(record, self.caller)
        return record

    def logprobs(self, engine: Engine, output: Any, echo_prompt: Any, offset: int) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        token_ids, logprobs = list(output.token_ids), list(output.logprobs or [])
        if echo_prompt is not None:
            token_ids = [*self.prompt_ids, *token_ids]
            logprobs = [*(echo_prompt or [None] * len(self.prompt_ids)), *logprobs]
        return vllm_compat.completion_logprobs(token_ids, logprobs, engine.tokenizer, self.req.logprobs, offset)


@router.post("/v1/completions")
async def completions(
    req: CompletionRequest,
    engine: EngineDep,
    settings: SettingsDep,
    interactions: InteractionsDep,
    caller: CallerDep,
    canary: CanaryDep,
    request: Request,
) -> Any:
    # the same trust boundary as chat (services/api/auth.py): the app's key, its quota, its users' namespace
    limit = settings.api.max_prompt_chars or 32 * engine.max_model_len
    if len(req.prompt_text()) > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {engine.max_model_len} tokens; the prompt holds "
            f"{len(req.prompt_text())} characters (more than {limit} never fit). Please reduce the prompt.",
            param="prompt",
            code="context_length_exceeded",
        )
    await take_chat_quota(request, caller)
    req.user = namespaced_user(caller, req.user)
    p = PreparedCompletion(req, engine, settings, canary)
    p.caller = caller
    watch = CanaryWatch(request, p.target, settings, engine.tokenizer)
    if req.stream:
        return StreamingResponse(
            _stream(p, engine, settings, interactions, watch),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    texts = [""] * req.n
    reasons: list[str | None] = [None] * req.n
    choices: list[dict[str, Any]] = [{} for _ in range(req.n)]
    completion_tokens = 0
    final = None
    try:
        async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
            final = out
    except Exception:
        await watch.failed()
        raise
    assert final is not None
    await watch.answered([o.text for o in final.outputs])
    for o in final.outputs:
        i = o.index
        texts[i], reasons[i] = o.text, o.finish_reason
        completion_tokens += len(o.token_ids)
        echo = final.prompt_logprobs if req.echo else None
        choices[i] = {
            "index": i,
            "text": (p.prompt + o.text) if req.echo else o.text,
            "logprobs": p.logprobs(engine, o, echo if req.echo else None, 0),
            "finish_reason": finish_reason(o.finish_reason),
        }
    usage = usage_counts(len(p.prompt_ids), completion_tokens)
    metrics.observe_tokens(req.model, usage["prompt_tokens"], completion_tokens)
    feedback = p.feedback(settings)
    interactions.record(p.record(texts, reasons, usage, feedback))
    return ORJSONResponse(
        {
            "id": p.id,
            "object": "text_completion",
            "created": p.created,
            "model": req.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": p.fingerprint,
            "feedback": feedback,
        }
    )


async def _stream(
    p: PreparedCompletion, engine: Engine, settings: Settings, interactions: InteractionLog, watch: CanaryWatch
) -> AsyncIterator[bytes]:
    n = p.req.n
    head = {"id": p.id, "object": "text_completion", "created": p.created, "model": p.req.model,
            "system_fingerprint": p.fingerprint}  # fmt: skip
    texts = [""] * n
    reasons: list[str | None] = [None] * n
    echoed = [not p.req.echo] * n
    offsets = [0] * n
    completion_tokens = 0
    first = True
    metrics.ACTIVE_STREAMS.inc()
    try:
        async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
            if first:
                first = False
                metrics.TIME_TO_FIRST_TOKEN.labels(p.req.model).observe(time.perf_counter() - p.started)
            events = []
            for o in out.outputs:
                i = o.index
                text, echo = o.text, None
                if not echoed[i]:
                    echoed[i] = True
                    text, echo = p.prompt + o.text, out.prompt_logprobs
                texts[i] += o.text
                reasons[i] = o.finish_reason
                completion_tokens += len(o.token_ids)
                logprobs = p.logprobs(engine, o, echo, offsets[i])
                if logprobs is not None and logprobs["tokens"]:
                    offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                choice = {
                    "index": i,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason(o.finish_reason),
                }
                events.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
            if events:
                yield b"".join(events)
    except Exception:
        await watch.failed()
        raise
    finally:
        metrics.ACTIVE_STREAMS.dec()
    await watch.answered(texts)
    usage = usage_counts(len(p.prompt_ids), completion_tokens)
    metrics.observe_tokens(p.req.model, usage["prompt_tokens"], completion_tokens)
    feedback = p.feedback(settings)
    interactions.record(p.record(texts, reasons, usage, feedback))
    last: dict[str, Any] = {**head, "choices": [], "feedback": feedback}
    if p.req.stream_options and p.req.stream_options.include_usage:
        last["usage"] = usage
    yield b"data: " + orjson.dumps(last) + b"\n\ndata: [DONE]\n\n"
