"""The gate's retention rule (workers/evaluation/retention.py): pure logic."""

from __future__ import annotations

from pathlib import Path

import pytest

from workers.evaluation.retention import RetentionCase, load_cases, parse_case, retention_failures, score_retention


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
    [failure] = retention_failures(score, "kept", 0.9, 0.05, "feedloop-v3")
    assert "2/3" in failure and "feedloop-v3" in failure
    assert not retention_failures(score, "kept", 0.6, 0.05, "base")


def test_a_reference_that_answers_nothing_right_cannot_be_regressed() -> None:
    score = score_retention([case("x")], ["no"], ["no"], 0.95)
    assert score.rate == 1.0 and not retention_failures(score, "kept", 0.9, 0.05, "base")


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
    assert retention_failures(score, "kept", 0.9, 0.05, "base") != []
    assert not retention_failures(score, "non_inferior", 0.9, 0.05, "base")
    assert (score.accuracy.only_first, score.accuracy.only_second) == (40, 4)
    assert score.accuracy.difference == pytest.approx(0.36)


def test_a_kept_floor_fails_a_candidate_whose_gains_pay_for_too_many_losses() -> None:
    # measured on SmolLM2: 54 of the base's 66 right answers kept (81.8%), 48 gained; held-out retention fell 6.7
    reference = [i < 66 for i in range(150)]
    candidate = [i < 54 or 66 <= i < 114 for i in range(150)]
    score = scored(reference, candidate)
    assert not retention_failures(score, "non_inferior", 0.9, 0.05, "base")  # the gains pay for the losses
    [failure] = retention_failures(score, "non_inferior", 0.9, 0.05, "base", kept_floor=0.85)
    assert "0.818 (54/66" in failure and "48 gained" in failure and "gate.kept_floor 0.85" in failure
    assert not retention_failures(score, "non_inferior", 0.9, 0.05, "base", kept_floor=0.8)
    # under "kept" the floor is gate.min_retention's job: kept_floor adds nothing
    assert len(retention_failures(score, "kept", 0.8, 0.05, "base", kept_floor=0.85)) == 0


def test_non_inferior_fails_a_candidate_that_may_be_worse_beyond_the_margin() -> None:
    # a partial collapse: it loses 29 of the reference's 65 right answers and gains 17 (measured on SmolLM2): the
    # difference's interval reaches above 0, but also far below -0.05
    reference = [i < 65 for i in range(150)]
    candidate = [i < 36 or 65 <= i < 82 for i in range(150)]
    score = scored(reference, candidate)
    assert score.accuracy.lower < -0.05 < 0 < score.accuracy.upper
    [failure] = retention_failures(score, "non_inferior", 0.0, 0.05, "base")
    assert "29 cases lost, 17 gained of 150" in failure and "-0.050" in failure
    assert not retention_failures(score, "non_inferior", 0.0, 0.2, "base")  # a looser margin lets it through


def test_non_inferior_passes_an_equal_candidate_with_little_churn_and_fails_one_the_set_cannot_bound() -> None:
    reference = [i < 100 for i in range(200)]
    assert not retention_failures(scored(reference, [1 <= i < 101 for i in range(200)]), "non_inferior", 1.0, 0.05, "b")
    # 3 lost and 1 gained of 60: maybe no worse, but 60 cases cannot show it is within 5 points
    small = scored([i < 30 for i in range(60)], [3 <= i < 31 for i in range(60)])
    assert small.accuracy.lower < -0.05 < 0 < small.accuracy.upper
    assert retention_failures(small, "non_inferior", 1.0, 0.05, "base") != []


def kinded(kinds: dict[str, tuple[list[bool], list[bool]]]):
    """Score a set made of several kinds: kind -> (reference right, candidate right) per case."""
    cases, reference, candidate = [], [], []
    for kind, (before, after) in kinds.items():
        for right_before, right_after in zip(before, after, strict=True):
            cases.append(parse_case({"prompt": "q", "expected": str(len(cases)), "kind": kind}, "test"))
            reference.append(str(len(cases) - 1) if right_before else "wrong")
            candidate.append(str(len(cases) - 1) if right_after else "wrong")
    return score_retention(cases, reference, candidate, 0.95)


def test_gains_on_one_kind_cannot_hide_a_loss_on_another() -> None:
    # sums: 10 of 100 right before, 70 after; capitals: 40 of 50 right before, 28 after (12 lost, nothing gained)
    score = kinded(
        {
            "arithmetic": ([i < 10 for i in range(100)], [i < 70 for i in range(100)]),
            "capital": ([i < 40 for i in range(50)], [i < 28 for i in range(50)]),
        }
    )
    assert score.accuracy.lower > 0  # pooled, the candidate is far better
    capital = score.by_kind["capital"]
    assert (capital.cases, capital.reference_right, capital.kept, capital.gained) == (50, 40, 28, 0)
    [failure] = retention_failures(score, "non_inferior", 0.0, 0.05, "base")
    assert "kind 'capital'" in failure and "12 lost, 0 gained of 50" in failure
    whole, kind = retention_failures(score, "kept", 0.9, 0.05, "base")  # 38 of 50 kept in all, 28 of 40 capitals
    assert "38/50" in whole and "kind 'capital'" in kind and "28/40" in kind


def test_a_kind_fails_only_when_shown_worse_by_more_than_the_margin() -> None:
    sums = ([i < 10 for i in range(100)], [i < 30 for i in range(100)])
    # an identical kind, a kind with a little churn, and a kind whose drop is real but within the margin all pass
    same = ([i < 40 for i in range(50)], [i < 40 for i in range(50)])
    churn = ([i < 40 for i in range(50)], [2 <= i < 41 for i in range(50)])
    small_drop = ([i < 180 for i in range(200)], [i < 174 for i in range(200)])
    for kind in (same, churn, small_drop):
        assert not retention_failures(kinded({"arithmetic": sums, "capital": kind}), "non_inferior", 0.0, 0.05, "b")
    # 5 of 25 right capitals lost: shown worse, by 0.167
    lost = ([i < 25 for i in range(30)], [i < 20 for i in range(30)])
    score = kinded({"arithmetic": sums, "capital": lost})
    assert score.by_kind["capital"].accuracy.upper < 0
    assert len(retention_failures(score, "non_inferior", 0.0, 0.05, "b")) == 1
    assert not retention_failures(score, "non_inferior", 0.0, 0.2, "b")  # a drop within a looser margin passes


def test_cases_without_a_kind_form_their_own_group_and_a_single_kind_adds_no_breakdown() -> None:
    single = kinded({"capital": ([True, False], [True, True])})
    assert single.by_kind == {}
    mixed = kinded({"capital": ([True], [True]), "": ([True, False], [False, False])})
    assert set(mixed.by_kind) == {"capital", "(no kind)"}
    assert mixed.to_dict()["by_kind"]["(no kind)"]["kept"] == 0


def test_a_case_keeps_its_kind_through_a_round_trip() -> None:
    row = {"messages": [{"role": "user", "content": "Capital of Peru?"}], "expected": ["Lima"], "kind": "capital"}
    assert parse_case(row, "test").to_row() == row
    assert "kind" not in parse_case({"prompt": "q", "expected": "1"}, "test").to_row()


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
        {"prompt": "q", "expected": "x", "kind": 3},
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
