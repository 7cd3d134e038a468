"""Wire types: OpenAI chat completions, feedback, adapters."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The OpenAI fields feedloop honours, plus vLLM's common extras (top_k, min_tokens, ignore_eos)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage]  # emptiness is checked by the route: OpenAI answers 400, not 422
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    user: str | None = Field(None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    top_k: int | None = None
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

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
            },
            exclude_none=True,
        )


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
