"""The gate's retention rule (workers/evaluation/retention.py): pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.evaluation.retention import RetentionCase, load_cases, parse_case, retention_failure, score_retention


def case(expected: str | list[str]) -> RetentionCase:
    return parse_case({"prompt": "q", "expected": expected}, "test")


def test_an_answer_is_right_when_it_contains_an_expected_string() -> None:
    assert case("Lima").answered_by("The capital of Peru is lima.")
    assert case(["56", "fifty-six"]).answered_by("Fifty-six.")
    assert not case("56").answered_by("It is 65.")


def test_an_expected_answer_counts_only_as_a_whole_word_and_digit_groups_read_as_one_number() -> None:
    assert not case("5").answered_by("7 plus 8 is 15.")  # not a substring of another number
    assert not case("Lima").answered_by("Limassol is in Cyprus.")
    assert case("8000").answered_by("8 kilograms is 8,000 grams.")
    assert case("1000000").answered_by("A million: 1,000,000.")
    assert case("8000").answered_by("It is 8\u202f000 grams.")
    assert not case("8000").answered_by("The numbers 8, 000 and 7.")
    assert case("5").answered_by("The answer is 5.")
    assert case("New York").answered_by("That is new york, surely.")


def test_only_what_the_reference_answers_right_is_counted() -> None:
    cases = [case("a"), case("b"), case("c"), case("d")]
    reference = ["a", "b", "c", "wrong"]
    candidate = ["a", "lost", "c", "d"]  # loses b, gains d
    score = score_retention(cases, reference, candidate, 0.95)
    assert (score.reference_right, score.kept, score.gained) == (3, 2, 1)
    assert score.rate == pytest.approx(2 / 3)
    assert score.interval[0] < score.rate < score.interval[1]
    assert score.lost == [{"question": "q", "before": "b", "after": "lost"}]
    failure = retention_failure(score, "kept", 0.9, 0.05, "feedloop-v3")
    assert failure is not None and "2/3" in failure and "feedloop-v3" in failure
    assert retention_failure(score, "kept", 0.6, 0.05, "base") is None


def test_a_reference_that_answers_nothing_right_cannot_be_regressed() -> None:
    score = score_retention([case("x")], ["no"], ["no"], 0.95)
    assert score.rate == 1.0 and retention_failure(score, "kept", 0.9, 0.05, "base") is None


def scored(reference_right: list[bool], candidate_right: list[bool]):
    cases = [case(str(i)) for i in range(len(reference_right))]
    return score_retention(
        cases,
        [str(i) if right else "wrong" for i, right in enumerate(reference_right)],
        [str(i) if right else "wrong" for i, right in enumerate(candidate_right)],
        0.95,
    )


def test_non_inferior_counts_what_the_candidate_gains_against_what_it_loses() -> None:
    # the reference answers 20 of 100 right; the candidate loses 4 of them and gains 40 others
    reference = [i < 20 for i in range(100)]
    candidate = [4 <= i < 60 for i in range(100)]
    score = scored(reference, candidate)
    assert score.rate == pytest.approx(0.8)
    assert retention_failure(score, "kept", 0.9, 0.05, "base") is not None
    assert retention_failure(score, "non_inferior", 0.9, 0.05, "base") is None
    assert (score.accuracy.only_first, score.accuracy.only_second) == (40, 4)
    assert score.accuracy.difference == pytest.approx(0.36)


def test_non_inferior_fails_a_candidate_that_may_be_worse_beyond_the_margin() -> None:
    # a partial collapse: it loses 29 of the reference's 65 right answers and gains 17 (measured on SmolLM2): the
    # difference's interval reaches above 0, but also far below -0.05
    reference = [i < 65 for i in range(150)]
    candidate = [i < 36 or 65 <= i < 82 for i in range(150)]
    score = scored(reference, candidate)
    assert score.accuracy.lower < -0.05 < 0 < score.accuracy.upper
    failure = retention_failure(score, "non_inferior", 0.0, 0.05, "base")
    assert failure is not None and "29 cases lost, 17 gained of 150" in failure and "-0.050" in failure
    assert retention_failure(score, "non_inferior", 0.0, 0.2, "base") is None  # a looser margin lets it through


def test_non_inferior_passes_an_equal_candidate_with_little_churn_and_fails_one_the_set_cannot_bound() -> None:
    reference = [i < 100 for i in range(200)]
    assert (
        retention_failure(scored(reference, [1 <= i < 101 for i in range(200)]), "non_inferior", 1.0, 0.05, "b") is None
    )
    # 3 lost and 1 gained of 60: maybe no worse, but 60 cases cannot show it is within 5 points
    small = scored([i < 30 for i in range(60)], [3 <= i < 31 for i in range(60)])
    assert small.accuracy.lower < -0.05 < 0 < small.accuracy.upper
    assert retention_failure(small, "non_inferior", 1.0, 0.05, "base") is not None


@pytest.mark.parametrize(
    "row",
    [
        {"expected": "x"},
        {"prompt": " ", "expected": "x"},
        {"prompt": "q"},
        {"prompt": "q", "expected": ""},
        {"prompt": "q", "expected": [1]},
        {"messages": [], "expected": "x"},
        ["not", "an", "object"],
    ],
)
def test_malformed_cases_are_refused_with_their_line(row: object) -> None:
    with pytest.raises(ValueError, match=r"cases\.jsonl:7"):
        parse_case(row, "cases.jsonl:7")


def test_load_cases_skips_blank_lines_and_stops_at_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text(
        '{"prompt": "a", "expected": "1"}\n\n{"messages": [{"role": "user", "content": "b"}], "expected": "2"}\n'
        '{"prompt": "c", "expected": "3"}\n'
    )
    cases = load_cases(path, limit=2)
    assert [c.messages[-1]["content"] for c in cases] == ["a", "b"]
