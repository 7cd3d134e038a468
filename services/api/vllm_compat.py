"""vLLM's own OpenAI-server machinery, reused by our routes so their answers match vLLM's server.

Our routes keep what vLLM's server lacks (adapter routing, the interaction log, the feedback token, the
adapter version in ``system_fingerprint``); for what vLLM's server already does, they call vLLM's code:

- logprobs: vLLM's formatters (``OpenAIServingChat._create_chat_logprobs``,
  ``OpenAIServingCompletion._create_completion_logprobs``), bound onto a small class of our own, since they
  use nothing of a serving object but the two helpers bound beside them;
- response_format: ``structured_outputs_from_response_format`` (what ``ChatCompletionRequest.to_sampling_params``
  calls) gives ``SamplingParams.structured_outputs``;
- tools: vLLM's ``ChatCompletionRequest`` validates ``tools``/``tool_choice``, the tool parser named by
  ``engine.tool_call_parser`` (as ``--tool-call-parser``) adjusts the request (``required`` and a named tool
  become a structured-output constraint) and parses the output, whole or delta by delta.

vLLM is imported on first use: importing it takes seconds.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from services.api.errors import ApiError

if TYPE_CHECKING:
    from vllm.sampling_params import StructuredOutputsParams


@functools.cache
def _formats() -> Any:
    from vllm.entrypoints.generate.base.serving import GenerateBaseServing
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    class Formats:
        return_tokens_as_token_ids = False
        _get_decoded_token = staticmethod(GenerateBaseServing._get_decoded_token)
        _get_top_logprobs = OpenAIServingChat._get_top_logprobs
        _create_chat_logprobs = OpenAIServingChat._create_chat_logprobs
        _create_completion_logprobs = OpenAIServingCompletion._create_completion_logprobs

    return Formats()


def chat_logprobs(output: Any, tokenizer: Any, top_logprobs: int | None) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one stream delta) for a vLLM CompletionOutput."""
    logprobs = _formats()._create_chat_logprobs(
        token_ids=output.token_ids,
        top_logprobs=output.logprobs,
        tokenizer=tokenizer,
        num_output_top_logprobs=top_logprobs,
    )
    return logprobs.model_dump(mode="json")


def completion_logprobs(
    token_ids: Any, logprobs: Any, tokenizer: Any, top_logprobs: int, initial_text_offset: int = 0
) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion (tokens, token_logprobs, top_logprobs, text_offset)."""
    result = _formats()._create_completion_logprobs(
        token_ids=token_ids,
        top_logprobs=logprobs,
        num_output_top_logprobs=top_logprobs,
        tokenizer=tokenizer,
        initial_text_offset=initial_text_offset,
    )
    return result.model_dump(mode="json")


def structured_outputs(response_format: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """``SamplingParams.structured_outputs`` for an OpenAI ``response_format``, as vLLM's server derives it."""
    if response_format is None:
        return None
    from pydantic import ValidationError
    from vllm.entrypoints.generate.base.protocol import ResponseFormat, structured_outputs_from_response_format
    from vllm.exceptions import VLLMValidationError

    try:
        parsed = ResponseFormat.model_validate(response_format)
    except ValidationError as e:
        raise ApiError(400, f"Invalid response_format: {e.errors()[0]['msg']}", param="response_format") from None
    if parsed.type == "json_schema" and (parsed.json_schema is None or parsed.json_schema.json_schema is None):
        raise ApiError(  # vLLM's helper asserts it (a 500): the route says what is missing
            400, "When response_format type is 'json_schema', the 'json_schema' field and its 'schema' must be "
            "provided.", param="response_format", code="invalid_response_format",
        )  # fmt: skip
    try:
        return structured_outputs_from_response_format(None, parsed)
    except (VLLMValidationError, ValueError) as e:
        raise ApiError(
            400, f"Invalid response_format: {e}", param="response_format", code="invalid_response_format"
        ) from None


class ToolCalling:
    """One request's tools: vLLM's request object (validation), the prompt's tool list, the constraint
    and the parsers. ``tool_choice`` "none" renders the tools and parses nothing, as vLLM's server does."""

    def __init__(self, body: dict[str, Any], messages: list[dict[str, Any]], tokenizer: Any, parser_cls: Any):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMValidationError

        try:
            request = ChatCompletionRequest(
                model=body.get("model"),
                messages=messages,
                tools=body.get("tools"),
                **{k: body[k] for k in ("tool_choice", "parallel_tool_calls") if body.get(k) is not None},
            )
        except VLLMValidationError as e:
            raise ApiError(400, str(e), param=e.parameter or "tools", code="invalid_tools") from None
        except ValueError as e:  # pydantic's ValidationError, and vLLM's validators raising ValueError
            raise ApiError(400, f"Invalid tools or tool_choice: {e}", param="tools", code="invalid_tools") from None
        choice = request.tool_choice
        if choice not in (None, "none") and parser_cls is None:
            # vLLM's server answers the same without --enable-auto-tool-choice --tool-call-parser
            raise ApiError(
                400,
                f"tool_choice={choice if isinstance(choice, str) else 'function'} needs a tool call parser: "
                "set FEEDLOOP_ENGINE__TOOL_CALL_PARSER (vLLM's --tool-call-parser)",
                param="tool_choice",
                code="tool_choice_unsupported",
            )
        self.tokenizer = tokenizer
        self.parser_cls = parser_cls if choice not in (None, "none") else None
        if self.parser_cls is not None:
            request = self.parser_cls(tokenizer, request.tools).adjust_request(request)
        self.request = request
        self.tool_dicts = [tool.model_dump() for tool in request.tools or []]
        self.structured_outputs = request.extract_structured_outputs()
        self.skip_special_tokens = request.skip_special_tokens
        self.choice = choice
        self.named = not isinstance(choice, str) and choice is not None

    def parser(self) -> Any:
        """A fresh parser (they are stateful: one per choice), or None when nothing is parsed."""
        return None if self.parser_cls is None else self.parser_cls(self.tokenizer, self.request.tools)

    def message(self, text: str, token_ids: Any, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The assistant message and finish reason for a whole output, as vLLM's server builds them."""
        from vllm.entrypoints.generate.base.protocol import ToolCall
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
        from vllm.renderers.chat_utils import make_tool_call_id

        parser = self.parser()
        if parser is None:
            return {"role": "assistant", "content": text}, finish_reason
        _, content, calls = parser.parse(text, self.request, enable_auto_tools=True, model_output_token_ids=token_ids)
        calls = maybe_filter_parallel_tool_calls(list(calls or []), self.request)  # parallel_tool_calls: false
        message: dict[str, Any] = {"role": "assistant", "content": content}
        forced = self.named or self.choice == "required"
        if forced:
            message["content"] = content or ""
        if calls:
            message["tool_calls"] = [
                ToolCall(id=tc.id or make_tool_call_id(), function=tc).model_dump(mode="json") for tc in calls
            ]
        if (calls and self.choice == "auto") or (self.choice == "required" and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return message, finish_reason

    def delta(self, parser: Any, output: Any, prompt_token_ids: list[int]) -> dict[str, Any] | None:
        """One stream delta through the choice's parser (None: nothing to send yet)."""
        from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls

        delta = parser.parse_delta(
            delta_text=output.text,
            delta_token_ids=list(output.token_ids),
            request=self.request,
            prompt_token_ids=prompt_token_ids,
            finished=output.finish_reason is not None,
        )
        if delta is None:
            return None
        return maybe_filter_parallel_tool_calls(delta, self.request).model_dump(mode="json", exclude_unset=True)


@functools.cache
def tool_parser_class(name: str | None, tokenizer: Any) -> Any:
    """vLLM's composed parser class for ``--tool-call-parser name`` (None: no tool calling)."""
    if not name:
        return None
    from vllm.parser import ParserManager

    return ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True, tokenizer=tokenizer)
