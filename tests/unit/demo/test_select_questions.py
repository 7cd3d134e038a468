from __future__ import annotations

from demo.corpus import QA
from demo.select_questions import right_in_every_pass, sampled_right_share


def _qa(n: int) -> QA:
    return QA("arithmetic", "plus", f"What is {n} plus 0?", f"{n} plus 0 is {n}.", str(n))


def test_a_question_wrong_in_any_pass_is_dropped_and_answers_map_back_to_their_questions() -> None:
    questions = [_qa(n) for n in range(20)]
    calls: list[list[str]] = []

    def answer(batch: list[QA]) -> list[str]:
        calls.append([q.question for q in batch])
        first_pass = len(calls) == 1
        # the second pass answers question 7 wrong wherever the shuffle put it; the first answers 3 wrong
        return [f"It is {int(q.expected) + (q.expected == ('3' if first_pass else '7'))}." for q in batch]

    right = right_in_every_pass(questions, 2, answer)
    assert [i for i, ok in enumerate(right) if not ok] == [3, 7]
    assert calls[0] == [q.question for q in questions]
    assert calls[1] != calls[0] and sorted(calls[1]) == sorted(calls[0])  # the second pass is another order


def test_one_pass_keeps_what_it_answered_right() -> None:
    questions = [_qa(n) for n in range(5)]
    right = right_in_every_pass(questions, 1, lambda batch: [q.answer for q in batch])
    assert right == [True] * 5


def test_sampled_share_counts_each_question_s_own_right_answers() -> None:
    questions = [_qa(n) for n in (4, 5, 6)]
    samples = {
        "4": ["4 plus 0 is 4."] * 8,  # always right
        "5": ["It is 5."] * 6 + ["It is 50.", "I don't know."],  # 6 of 8
        "6": ["It is 7."] * 7 + ["It is 6."],  # 1 of 8
    }
    shares = sampled_right_share(questions, lambda batch: [samples[q.expected] for q in batch])
    assert shares == [1.0, 0.75, 0.125]
