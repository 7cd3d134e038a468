"""Degenerate output: empty, or one phrase looping (the gate's smoke test and the canary's answers)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence


def distinct_bigram_ratio(token_ids: Sequence[int]) -> float:
    """Distinct token bigrams / bigrams: 1.0 for varied text, ~1/n for one token repeated n times."""
    bigrams = list(itertools.pairwise(token_ids))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def degenerate(text: str, token_ids: Sequence[int], min_distinct_ratio: float) -> bool:
    """Empty (or whitespace) text, or fewer distinct bigrams than min_distinct_ratio of its bigrams."""
    return not text.strip() or distinct_bigram_ratio(token_ids) < min_distinct_ratio
