"""Wire types: OpenAI chat completions, feedback, adapters."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator


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


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None

    content: str | list[TextPart] | None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(_Message):
    role: Literal["user"]
    content: str | list[TextPart]


class AssistantMessage(_Message):
    """An earlier answer: its text, or the tool calls it made (then content may be null or absent)."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallParam] | None = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = None


# The role decides which fields a turn needs (OpenAI's message types): content is required except on an
# assistant turn, so the schema says exactly which messages are accepted.
ChatMessage = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")  # required: vLLM constrains the answer to it
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's response_format: free text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(
        extra="forbid",
        # "json_schema" needs its schema (checked by the route: 400 invalid_response_format)
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {"properties": {"json_schema": {"type": "object"}}, "required": ["json_schema"]},
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def _first_unsupported(extra: dict[str, Any] | None) -> str | None:
    """The first field outside the schema that asks for something: null, false and empty values ask for
    nothing (clients send ``"store": false`` or ``"logit_bias": {}`` by default) and are accepted."""
    return next((name for name, value in (extra or {}).items() if not _asks_nothing(value)), None)


def _asks_nothing(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


def _not_a_bool(value: Any) -> Any:
    """JSON's types as the schema states them: pydantic's lax mode would take false for 0 (and StrictBool
    fields refuse 0 for false)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Up to 4 stop sequences, none empty (vLLM refuses an empty one)
Stop = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]


# What a field outside the schema may hold: a value that asks for nothing (null, false, "", [], {}). Any
# other value of a field the server does not implement is refused with 400 naming it (`unsupported()`).
ASKS_NOTHING: dict[str, Any] = {
    "description": "A field this server does not implement is accepted only with a value that asks for nothing",
    "anyOf": [
        {"type": "null"},
        {"type": "boolean", "enum": [False]},
        {"type": "string", "maxLength": 0},
        {"type": "array", "maxItems": 0},
        {"type": "object", "maxProperties": 0},
    ],
}


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


# OpenAI's (and vLLM's) function tool: what vLLM's request model accepts in `tools`.
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
                "strict": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
            },
        },
    },
}

# "none", "auto", "required" or a named function (vLLM checks it: 400 invalid_tools)
TOOL_CHOICE_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            },
        },
    ]
}

# A seed is an integer every JSON client holds exactly (|seed| <= 2**53, JavaScript's safe range; OpenAI's schema
# says int64). FastAPI's OpenAPI writes bounds as floats, and int64's would read back as other numbers (2**63 - 1
# as 9223372036854776000): with these bounds the published schema is exact.
SEED_MAX = 2**53


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields feedloop honours, plus vLLM's common extras (top_k, min_tokens, ignore_eos).

    Any other field is kept aside (``model_extra``) and refused by the route with 400 naming it: a parameter
    we do not implement is never silently ignored (the schema's additionalProperties say so)."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": ASKS_NOTHING,
            "allOf": [
                # top_logprobs needs logprobs: true (checked by the route: 400 invalid_logprobs, as OpenAI and vLLM)
                {
                    "if": {
                        "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                        "required": ["top_logprobs"],
                    },
                    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                },
                # greedy sampling makes one answer (vLLM: 400 invalid_sampling_parameters)
                {
                    "if": {"properties": {"temperature": {"const": 0}}, "required": ["temperature"]},
                    "then": {"properties": {"n": {"maximum": 1}}},
                },
                # a tool_choice needs tools (vLLM: 400 invalid_tools)
                {
                    "if": {"properties": {"tool_choice": {"not": {"type": "null"}}}, "required": ["tool_choice"]},
                    "then": {"properties": {"tools": {"type": "array"}}, "required": ["tools"]},
                },
            ],
        },
    )

    model: str
    # emptiness is checked by the route (OpenAI answers 400, not 422); the schema still says it is refused
    messages: list[ChatMessage] = Field(json_schema_extra={"minItems": 1})
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Stop | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    user: str | None = Field(None, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # 0 or -1: off (vLLM's rule)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: StrictBool = False
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # validated by vLLM's own request model (services/api/vllm_compat.py, 400 invalid_tools); the schema says its shape
    tools: Annotated[list[dict[str, Any]], Field(json_schema_extra={"minItems": 1, "items": TOOL_SCHEMA})] | None = None
    tool_choice: Annotated[str | dict[str, Any], Field(json_schema_extra=TOOL_CHOICE_SCHEMA)] | None = None
    parallel_tool_calls: StrictBool | None = None

    @field_validator(
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_tokens",
        "top_logprobs",
        mode="before",
    )
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any) -> Any:
        return _not_a_bool(v)

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
            if isinstance(m, AssistantMessage) and m.tool_calls:
                turn["tool_calls"] = [call.model_dump() for call in m.tool_calls]
            if isinstance(m, ToolMessage) and m.tool_call_id is not None:
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

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": ASKS_NOTHING,
            # greedy sampling makes one answer (vLLM: 400 invalid_sampling_parameters)
            "if": {"properties": {"temperature": {"const": 0}}, "required": ["temperature"]},
            "then": {"properties": {"n": {"maximum": 1}}},
        },
    )

    model: str
    # one prompt: a string or a list holding one string (a batch of prompts is refused with 400)
    # (an empty prompt is refused with 400 empty_prompt)
    prompt: (
        Annotated[str, Field(json_schema_extra={"minLength": 1})]
        | Annotated[
            list[str],
            Field(json_schema_extra={"minItems": 1, "maxItems": 1, "items": {"type": "string", "minLength": 1}}),
        ]
    )
    max_tokens: int = Field(16, ge=1)  # OpenAI's and vLLM's default for this endpoint
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Stop | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=-SEED_MAX, le=SEED_MAX)
    user: str | None = Field(None, max_length=256)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: StrictBool = False
    response_format: ResponseFormat | None = None
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # 0 or -1: off (vLLM's rule)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: StrictBool = False

    @field_validator(
        "max_tokens",
        "temperature",
        "top_p",
        "n",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "top_k",
        "min_tokens",
        mode="before",
    )
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any) -> Any:
        return _not_a_bool(v)

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
