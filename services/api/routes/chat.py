"""POST /v1/chat/completions: OpenAI-compatible, streaming and not, on the in-process engine."""

from __future__ import annotations

import asyncio
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
from services.api.schemas import ChatCompletionRequest
from services.core import metrics
from services.core.config import Settings
from services.engine.engine import Engine, Resolved
from services.feedback.events import interaction_record

router = APIRouter()


class Prepared:
    """A validated request: its id, resolved model, prompt tokens and sampling parameters."""

    def __init__(
        self,
        req: ChatCompletionRequest,
        engine: Engine,
        settings: Settings,
        canary: tuple[str, float] | None = None,
    ):
        reject_unsupported(req)
        if req.top_logprobs and not req.logprobs:
            raise ApiError(
                400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs",
                code="invalid_logprobs",
            )  # fmt: skip
        rf = req.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
            raise ApiError(
                400, "When response_format type is 'json_schema', the 'json_schema' field must be provided.",
                param="response_format", code="invalid_response_format",
            )  # fmt: skip
        if not req.messages:
            raise ApiError(
                400, "'messages' must contain at least one message.", param="messages", code="empty_messages"
            )
        self.target: Resolved = resolve_model(engine, req.model, req.user, canary, settings.engine.alias)
        self.req = req
        self.conversation = req.conversation()
        self.tools: vllm_compat.ToolCalling | None = None
        if req.tools is not None or req.tool_choice is not None:
            parser_cls = vllm_compat.tool_parser_class(settings.engine.tool_call_parser, engine.tokenizer)
            self.tools = vllm_compat.ToolCalling(req.tools_body(), self.conversation, engine.tokenizer, parser_cls)
        self.prompt_ids = engine.render(self.conversation, tools=self.tools.tool_dicts if self.tools else None)
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
        self.params = sampling_params(
            req,
            self.max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            structured_outputs=(
                self.tools.structured_outputs
                if self.tools
                else vllm_compat.structured_outputs(req.response_format_dict())
            ),
            skip_special_tokens=self.tools.skip_special_tokens if self.tools else True,
        )
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.started = time.perf_counter()
        self.created = int(time.time())

    def choice(self, i: int, text: str, output: Any, reason: str | None, tokenizer: Any) -> dict[str, Any]:
        """A whole answer's choice: its message (tool calls parsed by vLLM's parser), logprobs, finish reason."""
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = finish_reason(reason)
        if self.tools is not None and output is not None:
            message, finish = self.tools.message(text, output.token_ids, finish)
        logprobs = None
        if self.req.logprobs and output is not None:
            logprobs = vllm_compat.chat_logprobs(output, tokenizer, self.req.top_logprobs)
        return {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish}

    def stream_extras(self, tokenizer: Any) -> StreamExtras | None:
        if not self.req.logprobs and (self.tools is None or self.tools.parser_cls is None):
            return None
        return StreamExtras(self, tokenizer)

    def feedback(self, settings: Settings) -> dict[str, Any]:
        return feedback_token(settings, self.id, self.req.user, self.created)

    caller: Caller = ANONYMOUS  # set by the route: the app whose key made the request

    def record(
        self,
        texts: list[str],
        finish_reasons: list[str | None],
        usage: dict[str, int],
        feedback: dict[str, Any],
    ) -> dict[str, Any]:
        record = interaction_record(
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
        add_caller(record, self.caller)
        if self.tools is not None:  # the response is the model's raw text; its tool calls as vLLM parsed them
            record["tools"] = self.tools.tool_dicts
            message = self.tools.message(texts[0], (), finish_reasons[0])[0]
            record["tool_calls"] = message.get("tool_calls")
            if record["tool_calls"]:  # and the text outside the calls: the answer as a chat template renders it
                record["content"] = message.get("content") or ""
        return record


# Requests whose messages hold fewer characters are prepared (tokenized) on the event loop: a thread hop
# costs more than their tokenization. Longer ones go to a thread, so that no prompt stalls other routes.
_INLINE_CHARS = 4096


def _check_size(req: ChatCompletionRequest, engine: Engine, settings: Settings) -> int:
    """Refuse a request too large to fit before tokenizing it (400); return its characters."""
    if len(req.messages) > settings.api.max_messages:
        raise ApiError(
            400,
            f"'messages' holds {len(req.messages)} messages; at most {settings.api.max_messages} are accepted.",
            param="messages",
            code="too_many_messages",
        )
    chars = sum(len(m.text()) for m in req.messages)
    limit = settings.api.max_prompt_chars or 32 * engine.max_model_len
    if chars > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {engine.max_model_len} tokens; the messages hold {chars} "
            f"characters (more than {limit} never fit). Please reduce the length of the messages.",
            param="messages",
            code="context_length_exceeded",
        )
    return chars


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest,
    engine: EngineDep,
    settings: SettingsDep,
    interactions: InteractionsDep,
    caller: CallerDep,
    canary: CanaryDep,
    request: Request,
) -> Any:
    chars = _check_size(req, engine, settings)
    await take_chat_quota(request, caller)
    req.user = namespaced_user(caller, req.user)
    if chars <= _INLINE_CHARS:
        p = Prepared(req, engine, settings, canary)
    else:
        p = await asyncio.to_thread(Prepared, req, engine, settings, canary)
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
    outputs: list[Any] = [None] * req.n
    completion_tokens = 0
    try:
        async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
            for o in out.outputs:
                texts[o.index] += o.text
                reasons[o.index] = o.finish_reason
                outputs[o.index] = o
                completion_tokens += len(o.token_ids)
    except Exception:
        await watch.failed()
        raise
    await watch.answered(texts)
    usage = usage_counts(len(p.prompt_ids), completion_tokens)
    metrics.observe_tokens(req.model, usage["prompt_tokens"], completion_tokens)
    feedback = p.feedback(settings)
    interactions.record(p.record(texts, reasons, usage, feedback))
    return ORJSONResponse(
        {
            "id": p.id,
            "object": "chat.completion",
            "created": p.created,
            "model": req.model,
            "choices": [p.choice(i, texts[i], outputs[i], reasons[i], engine.tokenizer) for i in range(req.n)],
            "usage": usage,
            "system_fingerprint": p.target.adapter_name or engine.base_name,
            "feedback": feedback,
        }
    )


async def _stream(
    p: Prepared, engine: Engine, settings: Settings, interactions: InteractionsDep, watch: CanaryWatch
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
    extras = p.stream_extras(engine.tokenizer)
    metrics.ACTIVE_STREAMS.inc()
    try:
        # A client that disconnects cancels this generator; engine.generate then aborts the request.
        async for out in engine.generate(p.prompt_ids, p.params, p.id, p.target):
            if first:
                first = False
                metrics.TIME_TO_FIRST_TOKEN.labels(p.req.model).observe(time.perf_counter() - p.started)
            chunk = _chunk(out, head, texts, reasons, started, extras)
            completion_tokens += chunk[1]
            if chunk[0]:
                yield chunk[0]
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


class StreamExtras:
    """What a stream needs beyond text: logprobs per delta and one vLLM tool parser per choice."""

    def __init__(self, p: Prepared, tokenizer: Any):
        self.tokenizer = tokenizer
        self.logprobs = bool(p.req.logprobs)
        self.top_logprobs = p.req.top_logprobs
        self.tools = p.tools if p.tools is not None and p.tools.parser_cls is not None else None
        self.parsers = [self.tools.parser() for _ in range(p.req.n)] if self.tools else []
        self.called = [False] * p.req.n
        self.prompt_ids = p.prompt_ids

    def delta(self, o: Any) -> tuple[dict[str, Any] | None, Any, str | None]:
        """(delta or None: nothing to send, logprobs, finish reason) of one choice's output."""
        i = o.index
        logprobs = vllm_compat.chat_logprobs(o, self.tokenizer, self.top_logprobs) if self.logprobs else None
        finish = finish_reason(o.finish_reason)
        if self.tools is None:
            return {"content": o.text}, logprobs, finish
        delta = self.tools.delta(self.parsers[i], o, self.prompt_ids)
        if delta is None:
            if finish is None and logprobs is None:
                return None, None, None
            delta = {}
        if delta.get("tool_calls"):
            self.called[i] = True
        if self.called[i] and not self.tools.named and finish == "stop":
            finish = "tool_calls"
        return delta, logprobs, finish


def _chunk(
    out: Any,
    head: dict[str, Any],
    texts: list[str],
    reasons: list[str | None],
    started: list[bool],
    extras: StreamExtras | None = None,
) -> tuple[bytes, int]:
    """The SSE events for an engine output, one per choice as OpenAI sends them (empty if it carries
    nothing), and its token count. vLLM merges the choices of n > 1 into one output when the reader lags."""
    tokens = 0
    events = []
    for o in out.outputs:
        i = o.index
        texts[i] += o.text
        tokens += len(o.token_ids)
        reasons[i] = o.finish_reason
        logprobs = None
        finish = finish_reason(o.finish_reason)
        delta: dict[str, Any] = {"content": o.text}
        if extras is not None:
            parsed, logprobs, finish = extras.delta(o)
            if parsed is None:
                continue
            delta = parsed
        if not started[i]:
            started[i] = True
            delta["role"] = "assistant"
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        events.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
    return b"".join(events), tokens
