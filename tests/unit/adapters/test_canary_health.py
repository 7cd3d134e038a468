"""The canary's hard-failure rule and the degenerate-answer check (pure logic)."""

from __future__ import annotations

from services.adapters.canary_health import CanaryHealth
from services.core.repetition import degenerate, distinct_bigram_ratio


def test_no_hard_failure_before_min_requests_then_the_first_rate_over_its_limit() -> None:
    assert CanaryHealth(requests=9, errors=9).failure(10, 0.2, 0.5) is None  # too few answers to say
    assert CanaryHealth(requests=10, errors=2, degenerate=5).failure(10, 0.2, 0.5) is None  # at the limits
    assert CanaryHealth(requests=10, errors=3).failure(10, 0.2, 0.5) == "error rate 0.30 over 0.20 (3 of 10 answers)"
    assert CanaryHealth(requests=10, degenerate=6).failure(10, 0.2, 0.5) == (
        "degenerate rate 0.60 over 0.50 (6 of 10 answers)"
    )


def test_degenerate_answers_are_empty_or_looping() -> None:
    assert distinct_bigram_ratio([7] * 30) == 1 / 29
    assert degenerate("   ", [1, 2, 3], 0.3)
    assert degenerate("aaaa", [7] * 30, 0.3)
    assert not degenerate("Paris is the capital.", list(range(30)), 0.3)
    assert not degenerate("Yes.", [5], 0.3)  # a one-token answer is short, not a loop
