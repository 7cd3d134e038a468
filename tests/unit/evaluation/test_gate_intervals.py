"""The gate's confidence intervals (workers/evaluation/intervals.py): known values and simulated coverage."""

from __future__ import annotations

import random

import pytest

from workers.evaluation.intervals import paired_difference, wilson, z_value


def test_wilson_matches_the_published_example_and_stays_in_range() -> None:
    # Newcombe (1998a), example 81/263: 0.2553 to 0.3662.
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert z_value(0.95) == pytest.approx(1.95996, abs=1e-5)
    low, high = wilson(0, 10)
    assert low == 0.0 and 0.27 < high < 0.28
    low, high = wilson(10, 10)
    assert high == 1.0 and 0.72 < low < 0.73
    assert wilson(0, 0) == (0.0, 1.0)
    # More pairs, narrower interval around the same accuracy.
    assert wilson(80, 100)[1] - wilson(80, 100)[0] < wilson(8, 10)[1] - wilson(8, 10)[0]
    with pytest.raises(ValueError):
        wilson(11, 10)


def test_paired_difference_counts_agreement_and_brackets_the_difference() -> None:
    candidate = [True] * 12 + [True] * 6 + [False] * 2 + [False] * 4
    reference = [True] * 12 + [False] * 6 + [True] * 2 + [False] * 4
    comparison = paired_difference(candidate, reference)
    assert (comparison.both, comparison.only_first, comparison.only_second, comparison.neither) == (12, 6, 2, 4)
    assert comparison.difference == pytest.approx(4 / 24)
    assert comparison.lower < comparison.difference < comparison.upper
    # Swapping the models mirrors the interval.
    mirrored = paired_difference(reference, candidate)
    assert mirrored.lower == pytest.approx(-comparison.upper) and mirrored.upper == pytest.approx(-comparison.lower)
    # The same results twice: difference 0, an interval around it (not worse, not better).
    same = paired_difference(candidate, candidate)
    assert same.difference == 0 and same.lower < 0 < same.upper
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_a_clearly_worse_candidate_has_its_whole_interval_below_zero() -> None:
    reference = [True] * 40
    worse = [True] * 22 + [False] * 18
    assert paired_difference(worse, reference).upper < 0
    slightly = [True] * 38 + [False] * 2  # two pairs lost out of 40: not worse within the interval
    assert paired_difference(slightly, reference).upper > 0


@pytest.mark.parametrize(("pairs", "first", "second", "agree"), [(15, 0.6, 0.6, 0.8), (40, 0.9, 0.8, 0.3)])
def test_paired_interval_coverage_is_at_least_nominal(pairs: int, first: float, second: float, agree: float) -> None:
    rng = random.Random(pairs)
    runs, covered = 1000, 0
    truth = first - (agree * first + (1 - agree) * second)
    for _ in range(runs):
        a = [rng.random() < first for _ in range(pairs)]
        b = [x if rng.random() < agree else rng.random() < second for x in a]
        comparison = paired_difference(a, b)
        covered += comparison.lower <= truth <= comparison.upper
    assert covered / runs >= 0.93
