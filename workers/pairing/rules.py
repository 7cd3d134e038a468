"""Pure pairing logic: feedback events in, preference pair records out. No Redis, no network.

The rules (mirrored by the vote script in workers/pairing/store.py, which applies them atomically in Redis):
- one identity (the user, else the hashed client IP) has one current vote per completion: the one with the
  latest ``created_at`` counts (ties: the larger feedback id), a withdrawal removes it; a completion made
  without a user has one vote, whichever address casts it (``FeedbackEvent.vote_field``);
- a completion's label is the majority of its current votes (like / dislike; a tie is no label);
- ``same_prompt``: for one normalized prompt, each liked response is preferred to each disliked one;
- ``correction``: a user's correction is preferred to the response it corrects;
- ``weaker_answer``: a liked response is preferred to a deliberately weaker answer to the same prompt;
- ``stronger_answer``: a teacher's better answer is preferred to a disliked response.

Pair ids are deterministic (a hash of the strategy and the source ids), so a redelivered event yields the
same pair id and the store's SET NX keeps exactly one copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from services.feedback.events import FeedbackEvent, Message, answer_message

STRATEGIES = ("same_prompt", "correction", "weaker_answer", "stronger_answer")
GENERATED_STRATEGIES = ("weaker_answer", "stronger_answer")

PairRecord = dict[str, Any]


# --- prompt normalization -------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def normalize_messages(messages: Iterable[Message]) -> list[Message]:
    return [{**m, "content": normalize_text(m["content"])} for m in messages]


def calls_text(tool_calls: Sequence[Mapping[str, Any]] | None) -> str:
    """Tool calls as one canonical text: each call's name and its arguments as sorted-key JSON (a string that
    is not JSON, whitespace-normalized). Ids are left out: two answers making the same calls are the same."""
    if not tool_calls:
        return ""
    parts = []
    for call in tool_calls:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = orjson.loads(arguments)
            except orjson.JSONDecodeError:
                arguments = normalize_text(arguments)
        parts.append(orjson.dumps([function.get("name"), arguments], option=orjson.OPT_SORT_KEYS).decode())
    return "\n".join(parts)


def answer_text(message: Mapping[str, Any]) -> str:
    """What identifies an answer: its text and, for a tool-call answer, its calls (calls_text)."""
    calls = calls_text(message.get("tool_calls"))
    return f"{message['content']} \x1d {calls}" if calls else message["content"]


def prompt_hash(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Hash of the whitespace-normalized conversation prefix, system prompt included; for a tool-calling
    conversation also of its earlier tool calls and of the request's tools (the same hash as before for
    conversations without them)."""
    rows: list[list[Any]] = []
    for m in messages:
        row: list[Any] = [m["role"], normalize_text(m["content"])]
        if m.get("tool_calls"):
            row.append(calls_text(m["tool_calls"]))
        rows.append(row)
    if tools:
        rows.append(["tools", orjson.dumps(list(tools), option=orjson.OPT_SORT_KEYS).decode()])
    return hashlib.sha256(orjson.dumps(rows)).hexdigest()[:32]


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode()).hexdigest()[:16]


def pair_id(strategy: str, *source_ids: str) -> str:
    """Deterministic pair id: sha256 prefix of the strategy and its source ids (order matters)."""
    return hashlib.sha256("\x1f".join((strategy, *source_ids)).encode()).hexdigest()[:32]


# --- votes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vote:
    created_at: float
    feedback_id: str
    rating: str  # like | dislike | withdrawn
    correction_hash: str = ""


def supersedes(new: Vote, current: Vote | None) -> bool:
    """Whether new replaces current as an identity's vote: the latest counts, ties go to the larger id."""
    if current is None:
        return True
    return (new.created_at, new.feedback_id) > (current.created_at, current.feedback_id)


def majority_label(votes: Iterable[Vote]) -> str | None:
    """Majority of the current likes and dislikes; a tie (or no vote) is no label."""
    likes = dislikes = 0
    for vote in votes:
        if vote.rating == "like":
            likes += 1
        elif vote.rating == "dislike":
            dislikes += 1
    if likes > dislikes:
        return "like"
    if dislikes > likes:
        return "dislike"
    return None


def resolve_labels(events: Iterable[FeedbackEvent]) -> dict[str, str | None]:
    """Reference model of the vote script: completion id -> label after all events, in any order."""
    votes: dict[str, dict[str, Vote]] = {}
    for event in events:
        by_field = votes.setdefault(event.completion_id, {})
        vote = Vote(event.created_at, event.feedback_id, event.rating)
        if supersedes(vote, by_field.get(event.vote_field)):
            by_field[event.vote_field] = vote
    return {cid: majority_label(by_field.values()) for cid, by_field in votes.items()}


# --- pair records ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class RatedResponse:
    """One side of a pair: a response and the feedback that labelled it."""

    completion_id: str
    response: str
    adapter: str | None
    feedback_ids: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None  # a tool-call answer's calls, and its text outside them
    content: str | None = None

    def answer(self) -> Message:
        return answer_message(self.response, self.tool_calls, self.content)


def _assistant(answer: str | Message) -> list[Message]:
    return [{"role": "assistant", "content": answer} if isinstance(answer, str) else dict(answer)]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def make_pair(
    strategy: str,
    pid: str,
    prompt: Sequence[Message],
    chosen: str | Message,
    rejected: str | Message,
    *,
    feedback_ids: Iterable[str],
    completion_ids: Iterable[str],
    users: Iterable[str],
    adapter: str | None,
    created_at: float,
    phash: str,
    entry_id: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **extra: Any,
) -> PairRecord:
    """chosen and rejected: a text, or an assistant message (a tool-call answer keeps its tool_calls);
    tools: the request's tool definitions, kept with a tool-calling prompt."""
    if tools:
        extra["tools"] = [dict(tool) for tool in tools]
    return {
        "pair_id": pid,
        "prompt": [dict(m) for m in prompt],
        "chosen": _assistant(chosen),
        "rejected": _assistant(rejected),
        "strategy": strategy,
        "feedback_ids": _unique(feedback_ids),
        "completion_ids": _unique(completion_ids),
        "users": _unique(users),
        "adapter": adapter,
        "created_at": created_at,
        "prompt_hash": phash,
        "entry_id": entry_id,
        **extra,
    }


def same_prompt_pair(
    prompt: Sequence[Message],
    chosen: RatedResponse,
    rejected: RatedResponse,
    *,
    created_at: float,
    phash: str,
    entry_id: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> PairRecord:
    """A liked and a disliked response to the same normalized prompt; the id depends only on the two."""
    return make_pair(
        "same_prompt",
        pair_id("same_prompt", chosen.completion_id, rejected.completion_id),
        prompt,
        chosen.answer(),
        rejected.answer(),
        feedback_ids=[*chosen.feedback_ids, *rejected.feedback_ids],
        completion_ids=[chosen.completion_id, rejected.completion_id],
        users=[*chosen.users, *rejected.users],
        adapter=chosen.adapter,
        created_at=created_at,
        phash=phash,
        entry_id=entry_id,
        tools=tools,
    )


def correction_pair(event: FeedbackEvent, *, phash: str, entry_id: str = "") -> PairRecord | None:
    """The user's correction (chosen) against the response it corrects (rejected)."""
    if not event.correction or event.rating == "withdrawn":
        return None
    correction_hash = text_hash(event.correction)
    return make_pair(
        "correction",
        pair_id("correction", event.completion_id, event.identity, correction_hash),
        event.messages,
        event.correction,
        event.answer,
        feedback_ids=[event.feedback_id],
        completion_ids=[event.completion_id],
        users=[event.identity],
        adapter=event.adapter,
        created_at=event.created_at,
        phash=phash,
        entry_id=entry_id,
        tools=event.tools,
        correction_hash=correction_hash,
    )


def weaker_answer_pair(
    prompt: Sequence[Message],
    liked: RatedResponse,
    weaker: str,
    *,
    source: str,
    created_at: float,
    phash: str,
    entry_id: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> PairRecord:
    """A liked response (chosen) against a deliberately weaker answer to the same prompt (rejected)."""
    return make_pair(
        "weaker_answer",
        pair_id("weaker_answer", liked.completion_id),
        prompt,
        liked.answer(),
        weaker,
        feedback_ids=liked.feedback_ids,
        completion_ids=[liked.completion_id],
        users=liked.users,
        adapter=liked.adapter,
        created_at=created_at,
        phash=phash,
        entry_id=entry_id,
        tools=tools,
        generated_by=source,
    )


def stronger_answer_pair(
    prompt: Sequence[Message],
    disliked: RatedResponse,
    stronger: str,
    *,
    source: str,
    judged: bool,
    created_at: float,
    phash: str,
    entry_id: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> PairRecord:
    """A teacher's better answer (chosen) against a disliked response (rejected)."""
    return make_pair(
        "stronger_answer",
        pair_id("stronger_answer", disliked.completion_id),
        prompt,
        stronger,
        disliked.answer(),
        feedback_ids=disliked.feedback_ids,
        completion_ids=[disliked.completion_id],
        users=disliked.users,
        adapter=disliked.adapter,
        created_at=created_at,
        phash=phash,
        entry_id=entry_id,
        tools=tools,
        generated_by=source,
        judged=judged,
    )


def pairs_for_vote(
    event: FeedbackEvent,
    *,
    label: str | None,
    own: RatedResponse,
    counterparts: Sequence[tuple[RatedResponse, Sequence[Message]]],
    strategies: Iterable[str],
    phash: str,
    entry_id: str = "",
) -> list[PairRecord]:
    """Every pair one processed vote yields, given the completion's label after it and the responses to
    the same prompt currently rated the other way (each with the prompt it was asked with)."""
    enabled = set(strategies)
    pairs: list[PairRecord] = []
    prompt: Sequence[Message]
    if "correction" in enabled:
        pair = correction_pair(event, phash=phash, entry_id=entry_id)
        if pair is not None:
            pairs.append(pair)
    if "same_prompt" in enabled and label is not None:
        for other, other_prompt in counterparts:
            if other.completion_id == own.completion_id:
                continue
            if label == "like":
                chosen, rejected, prompt = own, other, event.messages
            else:
                chosen, rejected, prompt = other, own, other_prompt
            pairs.append(
                same_prompt_pair(
                    prompt,
                    chosen,
                    rejected,
                    created_at=event.created_at,
                    phash=phash,
                    entry_id=entry_id,
                    tools=event.tools,  # the prompt hash covers the tools: both answers had the same
                )
            )
    return pairs


def pair_is_live(
    pair: Mapping[str, Any],
    labels: Mapping[str, str | None],
    correction_hashes: Mapping[tuple[str, str], str],
) -> bool:
    """Whether the votes a pair came from still hold. Pairs are immutable once stored; a pair whose votes
    flipped or were withdrawn is left in place and excluded here, at snapshot time (and comes back if the
    votes flip back). labels: completion id -> current label; correction_hashes: (completion id, identity)
    -> correction hash of that identity's current vote."""
    strategy = pair["strategy"]
    cids = pair["completion_ids"]
    if strategy == "same_prompt":
        return labels.get(cids[0]) == "like" and labels.get(cids[1]) == "dislike"
    if strategy == "weaker_answer":
        return labels.get(cids[0]) == "like"
    if strategy == "stronger_answer":
        return labels.get(cids[0]) == "dislike"
    if strategy == "correction":
        return correction_hashes.get((cids[0], pair["users"][0])) == pair.get("correction_hash")
    return False


# --- LLM judge (stronger_answer verification) ------------------------------------------------------------

JUDGE_RUBRIC = (
    "You are grading two assistant answers to the same conversation. Judge helpfulness, correctness, "
    "honesty and harmlessness; ignore length and style unless they hurt the answer. Reply with exactly one "
    "letter: A if answer A is better, B if answer B is better."
)


def judge_messages(prompt: Sequence[Message], answer_a: str, answer_b: str) -> list[Message]:
    conversation = "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)
    return [
        {"role": "system", "content": JUDGE_RUBRIC},
        {
            "role": "user",
            "content": f"Conversation:\n{conversation}\n\nAnswer A:\n{answer_a}\n\nAnswer B:\n{answer_b}\n\n"
            "Which answer is better? Reply A or B.",
        },
    ]


def judge_order(pid: str) -> bool:
    """Whether the candidate answer is shown first (A); alternates by pair id against position bias."""
    return int(pid[:2], 16) % 2 == 0


def parse_verdict(text: str) -> str | None:
    """'A' or 'B' from a judge reply, None when it gave neither (or both)."""
    cleaned = text.strip().upper()
    first = cleaned[:1]
    if first in ("A", "B") and (len(cleaned) == 1 or not cleaned[1].isalpha()):
        return first
    has_a = "ANSWER A" in cleaned
    has_b = "ANSWER B" in cleaned
    if has_a != has_b:
        return "A" if has_a else "B"
    return None
