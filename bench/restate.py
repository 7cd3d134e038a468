"""Corrections restated in the base model's own words, for `bench/dpo_data_variants.py`'s ``restated`` variant.

A user's correction says what the answer should hold in the user's words ("8 plus 6 is 14."); a small model trained
on it learns the terse form too, and answers sums without the working it needs. The variant asks the base model to
answer the corrected prompt with the correction as a fact in its system message, and keeps an answer only when it
holds the correction's numbers and names (context distillation: train the model to say without the context what it
says with it). Measured on one SmolLM2 demo dataset it did worse than the corrections as written (BENCHMARKS.md,
"Corrections restated in the model's own words"), so the product does not do it.
"""

from __future__ import annotations

import re
from typing import Any

Message = dict[str, Any]

_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'-]*")
_SENTENCE_END = re.compile(r"[.!?:;]\s+|\n+")
_DIGIT_GROUP = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# Capitalised only because they start a sentence; a capitalised word elsewhere is taken as a name.
_SENTENCE_STARTERS = frozenset(
    """a an and as at but by for from he her his i i'm in is it it's its my no of on or our she so that the their
    then there these they this those to we what when where which who why yes you your""".split()  # noqa: SIM905
)


_FIRST_PERSON = frozenset({"i", "i'm", "i've", "i'd", "i'll"})


def key_content(text: str) -> frozenset[str]:
    """The numbers (digit groups joined) and names (capitalised words not at a sentence's start, unless
    they are no common sentence starter) in a correction."""
    text = text.replace("\u2019", "'")
    keys = {_DIGIT_GROUP.sub("", n).rstrip(".,") for n in _NUMBER.findall(text)}
    for sentence in _SENTENCE_END.split(text):
        for i, word in enumerate(_WORD.findall(sentence)):
            if not word[0].isupper() or word.casefold() in _FIRST_PERSON:
                continue
            if i == 0 and word.casefold() in _SENTENCE_STARTERS:
                continue
            keys.add(word.rstrip("'-"))
    return frozenset(keys)


def keeps_content(correction: str, restatement: str) -> bool:
    """Whether the restatement holds every key of the correction (as whole words, names case-insensitively),
    and the correction has at least one key to check."""
    keys = key_content(correction)
    if not keys:
        return False
    folded = _DIGIT_GROUP.sub("", restatement).casefold()
    return all(re.search(rf"(?<![\w]){re.escape(key.casefold())}(?![\w])", folded) for key in keys)


_LAST_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def whole_sentences(text: str) -> str:
    """The text up to its last finished sentence: an answer cut off by max_tokens would teach stopping mid-way.
    A text with no finished sentence is returned as it is."""
    text = text.strip()
    ends = [m.end() for m in _LAST_SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def restatement_messages(prompt: list[Message], correction: str) -> list[Message]:
    """The prompt with the correction given as a fact at the head of its system message."""
    fact = f"Fact: {correction.strip()}"
    if prompt and prompt[0].get("role") == "system":
        head = prompt[0]
        return [{**head, "content": f"{fact}\n\n{head.get('content') or ''}".rstrip()}, *prompt[1:]]
    return [{"role": "system", "content": fact}, *prompt]
