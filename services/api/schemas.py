"""Wire types: OpenAI chat completions, feedback, adapters."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCallParam(BaseModel):
    """A tool call of an earlier assistant turn."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only on an assistant turn that made tool calls
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant turn with tool_calls)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _first_unsupported(extra: dict[str, Any] | None) -> str | None:
    """The first field outside the schema that asks for something: null, false and empty values ask for
    nothing (clients send ``"store": false`` or ``"logit_bias": {}`` by default) and are accepted."""
    return next((name for name, value in (extra or {}).items() if not _asks_nothing(value)), None)


def _asks_nothing(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields feedloop honours, plus vLLM's common extras (top_k, min_tokens, ignore_eos).

    Any other field is kept aside (``model_extra``) and refused by the route with 400 naming it: a parameter
    we do not implement is never silently ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    # emptiness is checked by the route (OpenAI answers 400, not 422); the schema still says it is refused
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's schema
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    top_k: int | None = Field(None, le=2**31 - 1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None  # validated by vLLM's own request model (services/api/vllm_compat.py)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def conversation(self) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = []
        for m in self.messages:
            turn: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                turn["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if m.tool_call_id is not None:
                turn["tool_call_id"] = m.tool_call_id
            turns.append(turn)
        return turns

    def unsupported(self) -> str | None:
        """The first field given that feedloop does not implement (None: all are honoured)."""
        return _first_unsupported(self.model_extra)

    def response_format_dict(self) -> dict[str, Any] | None:
        return self.response_format.model_dump(by_alias=True, exclude_none=True) if self.response_format else None

    def tools_body(self) -> dict[str, Any]:
        """The fields vLLM's own request model validates for tool calling."""
        return self.model_dump(
            include={"model", "tools", "tool_choice", "parallel_tool_calls", "response_format"},
            exclude_none=True,
            by_alias=True,
        )

    def sampling(self) -> dict[str, object]:
        """The sampling parameters as given (recorded with the interaction)."""
        return self.model_dump(
            include={
                "temperature",
                "top_p",
                "max_tokens",
                "max_completion_tokens",
                "stop",
                "n",
                "seed",
                "presence_penalty",
                "frequency_penalty",
                "top_k",
                "min_tokens",
                "ignore_eos",
                "logprobs",
                "top_logprobs",
                "response_format",
                "tool_choice",
            },
            exclude_none=True,
            by_alias=True,
        )


class CompletionRequest(BaseModel):
    """POST /v1/completions: a plain prompt (one string), OpenAI's fields as vLLM's server honours them.

    Other fields (suffix, best_of, logit_bias, token-id prompts, ...) are refused with 400 naming them."""

    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's and vLLM's default for this endpoint
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's schema
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(None, le=2**31 - 1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> list[str] | None:
        return ChatCompletionRequest._at_most_four_stops(v)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if self.prompt else ""

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt"
        return _first_unsupported(self.model_extra)

    def sampling(self) -> dict[str, object]:
        return self.model_dump(
            include={"temperature", "top_p", "max_tokens", "stop", "n", "seed", "presence_penalty",
                     "frequency_penalty", "logprobs", "echo", "top_k", "min_tokens", "ignore_eos"},
            exclude_none=True,
        )  # fmt: skip


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    completion_id: str = Field(min_length=1, max_length=128)
    token: str = Field(min_length=1, max_length=512)
    rating: Literal["like", "dislike"]
    comment: str | None = Field(None, min_length=1)
    correction: str | None = Field(None, min_length=1)
    user: str | None = Field(None, max_length=256)


class FeedbackWithdrawal(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=512)
    user: str | None = Field(None, max_length=256)
