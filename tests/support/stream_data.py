"""Feedback stream entries for the fault tests: prompts with a liked and a disliked answer (one pair each)."""

from __future__ import annotations

from typing import Any

from services.core.keys import Keys
from tests.support.feedback_events import entry, feedback_event
from workers.pairing import rules as pairing


def two_answer_prompts(client: Any, keys: Keys, first: int, last: int) -> set[str]:
    """A liked and a disliked answer per prompt number in [first, last), written to the feedback stream: one
    same_prompt pair each. Returns the pair ids they must give."""
    pipe = client.pipeline(transaction=False)
    for i in range(first, last):
        prompt = f"Fault question {i}: what is {i} plus one?"
        like = feedback_event(f"L{i}", "like", f"a{i}", prompt=prompt, response=f"{i + 1}.")
        dislike = feedback_event(f"D{i}", "dislike", f"b{i}", prompt=prompt, response=f"{i + 2}.")
        pipe.xadd(keys.feedback_stream, entry(like))
        pipe.xadd(keys.feedback_stream, entry(dislike))
    pipe.execute()
    return {pairing.pair_id("same_prompt", f"L{i}", f"D{i}") for i in range(first, last)}


def pair_ids(client: Any, keys: Keys) -> set[str]:
    return {p.decode() for p in client.zrange(keys.pairs_index, 0, -1)}
