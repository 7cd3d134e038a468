"""The feedback stream event: the one definition of its shape and of who a voter is.

The API builds an event's head (``event_head``) and the interaction record it embeds (``interaction_record``);
the vote script (services/feedback/votes.py) appends the stored interaction under "interaction" and XADDs it
as the entry's field ``event``; the pairs worker parses it back with ``parse_event``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

RATINGS = ("like", "dislike", "withdrawn")
ROLES = ("system", "user", "assistant", "tool", "developer")
EVENT_FIELD = "event"
# Where the one vote on a completion made without a user is kept, in the API's votes hash and in pairing's:
# one vote per completion (per token), whoever casts it. The voter's identity (their address's keyed hash)
# still goes with the vote, for rate buckets, caps and voter agreement.
ANONYMOUS_VOTE_FIELD = "~anonymous"
# A chat message: role and content, and where the conversation had them an assistant turn's "tool_calls"
# (OpenAI's shape: id, type "function", function {name, arguments}) and a tool turn's "tool_call_id".
Message = dict[str, Any]


def voter_identity(user: str | None, ip_hash: str) -> str:
    """Who votes: the user when there is one, else the keyed hash of the client address."""
    return user if user else f"ip:{ip_hash}"


def event_head(
    feedback_id: str,
    completion_id: str,
    voter: str,
    ip_hash: str,
    rating: str,
    comment: str | None,
    correction: str | None,
    created_at: float,
) -> dict[str, Any]:
    """Every field of an event but the interaction, which the vote script appends from Redis."""
    return {
        "feedback_id": feedback_id,
        "completion_id": completion_id,
        "user": voter,
        "ip_hash": ip_hash,
        "rating": rating,
        "comment": comment,
        "correction": correction,
        "created_at": created_at,
    }


def interaction_record(
    completion_id: str,
    messages: list[dict[str, Any]],
    choices: list[str],
    finish_reasons: list[str | None],
    *,
    model: str,
    adapter: str | None,
    sampling: dict[str, Any],
    user: str | None,
    usage: dict[str, int],
    created_at: int,
    finished_at: float,
    expires_at: int,
) -> dict[str, Any]:
    """What the API stores per completion and each feedback event embeds (the first choice is the response).
    A chat request with tools adds "tools" (its tool definitions), "tool_calls" (the answer's calls as vLLM's
    parser read them, or None) and, with calls, "content" (the answer's text outside them); parse_event reads
    them back into FeedbackEvent.answer."""
    return {
        "id": completion_id,
        "messages": messages,
        "response": choices[0],
        "choices": choices,
        "finish_reasons": finish_reasons,
        "model": model,
        "adapter": adapter,
        "sampling": sampling,
        "user": user,
        "usage": usage,
        "created_at": created_at,
        "finished_at": finished_at,
        "expires_at": expires_at,
    }


class MalformedEvent(ValueError):
    """A stream entry that can never become a pair (bad JSON, missing or mistyped fields)."""


@dataclass(slots=True)
class FeedbackEvent:
    feedback_id: str
    completion_id: str
    user: str | None
    ip_hash: str
    rating: str
    comment: str | None
    correction: str | None
    created_at: float
    messages: list[Message]
    response: str
    model: str
    adapter: str | None
    tool_calls: list[dict[str, Any]] | None = None  # the answer's tool calls as vLLM's parser read them
    content: str | None = None  # with tool_calls: the answer's text outside its calls (the parser's content)
    tools: list[dict[str, Any]] | None = None  # the request's tool definitions (part of the prompt)
    anonymous: bool = False  # the completion was made without a user (its interaction says user: null)

    @property
    def identity(self) -> str:
        return voter_identity(self.user, self.ip_hash)

    @property
    def vote_field(self) -> str:
        """Where this vote is kept among the completion's votes: its voter's, or the completion's one
        anonymous vote (a later vote from another address replaces it, as in the API)."""
        return ANONYMOUS_VOTE_FIELD if self.anonymous else self.identity

    @property
    def answer(self) -> Message:
        """The answer as an assistant message: its text, or its tool calls and the text around them."""
        return answer_message(self.response, self.tool_calls, self.content)


def answer_message(response: str, tool_calls: list[dict[str, Any]] | None, content: str | None) -> Message:
    """An interaction's answer as an assistant message. A tool-call answer is its parsed calls and the text
    outside them (not the raw ``<tool_call>`` text it was generated as), as a chat template renders it back."""
    if not tool_calls:
        return {"role": "assistant", "content": response}
    return {"role": "assistant", "content": content or "", "tool_calls": tool_calls}


_FEEDBACK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_OPTIONAL_STR = (str, type(None))


def _tool_calls(value: Any) -> list[dict[str, Any]] | None:
    """OpenAI-shaped tool calls (id, type "function", function {name, arguments}), or None if malformed."""
    if type(value) is not list or not value:
        return None
    calls = []
    for call in value:
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict or type(function.get("name")) is not str:
            return None
        arguments = function.get("arguments")
        if type(arguments) not in (str, dict) or call.get("type", "function") != "function":
            return None
        calls.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": function["name"], "arguments": arguments},
            }
        )
    return calls


def _messages(value: Any) -> list[Message] | None:
    if type(value) is not list or not value:
        return None
    messages: list[Message] = []
    for item in value:
        if type(item) is not dict:
            return None
        role, content = item.get("role"), item.get("content")
        if role not in ROLES or type(content) is not str:
            return None
        message: Message = {"role": role, "content": content}
        if len(item) > 2:  # a tool-calling conversation: keep what its chat template renders
            if "tool_calls" in item and item["tool_calls"] is not None:
                calls = _tool_calls(item["tool_calls"])
                if calls is None or role != "assistant":
                    return None
                message["tool_calls"] = calls
            if "tool_call_id" in item and item["tool_call_id"] is not None:
                if type(item["tool_call_id"]) is not str:
                    return None
                message["tool_call_id"] = item["tool_call_id"]
        messages.append(message)
    return messages


def _valid_tools(value: Any) -> bool:
    """A request's tool definitions: absent (None), or a list of objects."""
    return value is None or (type(value) is list and all(type(tool) is dict for tool in value))


def _problem(data: Any) -> str:
    """Why an event failed the fast checks in parse_event (the slow path, only for bad entries)."""
    if not isinstance(data, dict):
        return "event must be a JSON object"
    for name in ("feedback_id", "completion_id", "rating"):
        if not isinstance(data.get(name), str) or not data[name]:
            return f"field {name!r} must be a non-empty string"
    if not _FEEDBACK_ID.fullmatch(data["feedback_id"]):
        return "feedback_id must be 1-128 characters of [A-Za-z0-9_.:-]"
    if data["rating"] not in RATINGS:
        return f"rating {data['rating']!r} is not one of {RATINGS}"
    created_at = data.get("created_at")
    if isinstance(created_at, bool) or not isinstance(created_at, int | float):
        return "created_at must be a number"
    for name in ("user", "ip_hash", "comment", "correction"):
        if not isinstance(data.get(name), _OPTIONAL_STR):
            return f"field {name!r} must be a string or null"
    if not data.get("user") and not data.get("ip_hash"):
        return "an event needs a user or an ip_hash"
    interaction = data.get("interaction")
    if not isinstance(interaction, dict):
        return "interaction must be an object"
    if not isinstance(interaction.get("response"), str):
        return "interaction.response must be a string"
    for name in ("model", "adapter"):
        if not isinstance(interaction.get(name), _OPTIONAL_STR):
            return f"interaction.{name} must be a string or null"
    if _messages(interaction.get("messages")) is None:
        return (
            f"interaction.messages must be a non-empty list of {{role in {ROLES}, content: string}} "
            "(tool_calls only on assistant turns, in OpenAI's shape)"
        )
    if interaction.get("tool_calls") is not None and _tool_calls(interaction["tool_calls"]) is None:
        return "interaction.tool_calls must be a list of {id, type: function, function: {name, arguments}}"
    if not isinstance(interaction.get("content"), _OPTIONAL_STR):
        return "interaction.content must be a string or null"
    if not _valid_tools(interaction.get("tools")):
        return "interaction.tools must be a list of objects"
    return "invalid event"


def parse_event(fields: Mapping[bytes, bytes] | Mapping[str, Any]) -> FeedbackEvent:
    """Parse one feedback stream entry (field ``event`` holding JSON) or raise MalformedEvent."""
    raw = fields.get(b"event") if b"event" in fields else fields.get(EVENT_FIELD)  # type: ignore[call-overload]
    if raw is None:
        raise MalformedEvent("entry has no 'event' field")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"event is not valid JSON: {exc}") from None
    # fast path: one pass of exact type checks; any failure is explained by _problem()
    try:
        feedback_id, completion_id, rating = data["feedback_id"], data["completion_id"], data["rating"]
        created_at, interaction = data["created_at"], data["interaction"]
        user, ip_hash = data.get("user"), data.get("ip_hash")
        comment, correction = data.get("comment"), data.get("correction")
        response, model, adapter = (
            interaction["response"],
            interaction.get("model"),
            interaction.get("adapter"),
        )
        messages = _messages(interaction.get("messages"))
        raw_calls = interaction.get("tool_calls")
        tool_calls = _tool_calls(raw_calls) if raw_calls else None
        content = interaction.get("content")
        tools = interaction.get("tools")
        # an interaction without the field (written before it existed) keeps one vote per identity
        anonymous = "user" in interaction and interaction["user"] is None
        ok = (
            type(feedback_id) is str
            and type(completion_id) is str
            and completion_id != ""
            and rating in RATINGS
            and type(created_at) in (float, int)
            and type(user) in _OPTIONAL_STR
            and type(ip_hash) in _OPTIONAL_STR
            and bool(user or ip_hash)
            and type(comment) in _OPTIONAL_STR
            and type(correction) in _OPTIONAL_STR
            and type(response) is str
            and type(model) in _OPTIONAL_STR
            and type(adapter) in _OPTIONAL_STR
            and messages is not None
            and _FEEDBACK_ID.fullmatch(feedback_id) is not None
            and (tool_calls is not None or not raw_calls)
            and type(content) in _OPTIONAL_STR
            and _valid_tools(tools)
        )
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise MalformedEvent(_problem(data))
    return FeedbackEvent(
        feedback_id,
        completion_id,
        user,
        ip_hash or "",
        rating,
        comment,
        correction,
        float(created_at),
        messages,  # type: ignore[arg-type]
        response,
        model or "",
        adapter,
        tool_calls,
        content if tool_calls else None,
        tools or None,
        anonymous,
    )
