"""Confidence intervals for the evaluation gate's held-out accuracy (pure math, standard library only).

* :func:`wilson`: the Wilson score interval for one accuracy (correct / pairs). Unlike the normal
  (Wald) interval it stays inside [0, 1] and keeps its coverage on the small splits the gate sees
  (a few dozen pairs, accuracies near 1).
* :func:`paired_difference`: an interval for ``accuracy(candidate) - accuracy(reference)`` when both are
  scored on the same pairs: Newcombe's (1998) hybrid score method 10 for paired proportions, built from the
  two Wilson intervals and the correlation of the two models' per-pair results. Pairs both models get
  right (or both wrong) carry no information on the difference, so a candidate that agrees with the
  reference on most pairs gets a narrow interval even on a small split.

Newcombe, R. G. (1998). Improved confidence intervals for the difference between binomial proportions
based on paired data. Statistics in Medicine 17, 2635-2650.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any


def z_value(confidence: float) -> float:
    """Two-sided normal quantile: 1.96 for 0.95."""
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when there is no data."""
    if total <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= total:
        raise ValueError("correct must be between 0 and total")
    z = z_value(confidence)
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    spread = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    lower = 0.0 if correct == 0 else max(0.0, centre - spread)
    upper = 1.0 if correct == total else min(1.0, centre + spread)
    return lower, upper


@dataclass(frozen=True)
class PairedComparison:
    """Per-pair agreement of two models on one held-out split, and the difference of their accuracies."""

    both: int  # pairs both models get right
    only_first: int  # the first (candidate) right, the second (reference) wrong
    only_second: int
    neither: int
    difference: float  # accuracy(first) - accuracy(second)
    lower: float
    upper: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95) -> PairedComparison:
    """Newcombe's method 10 interval for accuracy(first) - accuracy(second) on the same pairs."""
    if len(first) != len(second):
        raise ValueError("both models must be scored on the same pairs")
    both = sum(1 for a, b in zip(first, second, strict=True) if a and b)
    only_first = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
    neither = len(first) - both - only_first - only_second
    n = len(first)
    if n == 0:
        return PairedComparison(0, 0, 0, 0, 0.0, -1.0, 1.0, confidence)
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson(both + only_first, n, confidence)
    l2, u2 = wilson(both + only_second, n, confidence)
    # Newcombe's phi: the correlation of the two models' results, with his correction (0 for
    # 0 <= ad - bc <= n/2) so that the interval is not made too narrow by a weak positive correlation.
    product = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    cross: float = both * neither - only_first * only_second
    if cross > n / 2:
        cross -= n / 2
    elif cross >= 0:
        cross = 0
    phi = cross / math.sqrt(product) if product > 0 else 0.0
    difference = p1 - p2
    down = math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    up = math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return PairedComparison(
        both,
        only_first,
        only_second,
        neither,
        difference,
        max(-1.0, difference - down),
        min(1.0, difference + up),
        confidence,
    )
