from __future__ import annotations

import pytest

from bench.regression_churn import churn, unselected_questions


def test_churn_counts_lost_gained_and_the_share_of_right_answers_kept() -> None:
    base = [True, True, True, True, False, False, False, False]
    tuned = [True, False, True, True, True, True, True, False]
    assert churn(base, tuned) == {"lost": 1, "gained": 3, "kept_of_base_right": 0.75}


def test_a_base_with_no_right_answer_keeps_nothing_and_loses_nothing() -> None:
    assert churn([False, False], [True, False]) == {"lost": 0, "gained": 1, "kept_of_base_right": 0.0}


def test_the_unselected_questions_leave_the_held_out_ones_out_and_follow_the_seed() -> None:
    first = unselected_questions(set(), 50, seed=0)
    held_out = {qa.question for qa in first[:10]}
    drawn = unselected_questions(held_out, 200, seed=0)
    assert not held_out & {qa.question for qa in drawn}
    assert [qa.question for qa in unselected_questions(held_out, 200, seed=0)] == [qa.question for qa in drawn]
    assert [qa.question for qa in unselected_questions(held_out, 200, seed=1)] != [qa.question for qa in drawn]
    assert {qa.kind for qa in drawn} == {"arithmetic", "capital", "conversion"}
    with pytest.raises(ValueError):
        churn([True], [True, False])
