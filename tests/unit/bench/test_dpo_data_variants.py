from __future__ import annotations

import json
from pathlib import Path

from bench.dpo_data_variants import anchors, ordinary_prompts, unasked, without_ordinary_corrections, write_variant
from demo.corpus import QA

SUM = QA("arithmetic", "plus", "What is 3 plus 4?", "3 plus 4 is 7.", "7")
QUESTIONS = {SUM.question: SUM}


def row(prompt: str, chosen: str = "a", rejected: str = "b") -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def test_ordinary_prompts_are_the_corpus_questions_asked_each_once() -> None:
    rows = [row("Who made you?"), row(SUM.question), {"prompt": SUM.question, "completion": "x", "label": True}]
    assert ordinary_prompts(rows, QUESTIONS) == [SUM.question]


def test_an_anchor_chooses_the_greedy_answer_and_right_only_keeps_right_over_wrong() -> None:
    prompts = [SUM.question] * 3
    greedy = ["The answer is 7.", "The answer is 7.", "The answer is 9."]
    weaker = ["The answer is 7.", "Blue 12.", "It is 7."]  # same / right over wrong / wrong over right
    every = anchors(prompts, greedy, weaker, QUESTIONS, right_only=False)
    assert [(a["chosen"][0]["content"], a["rejected"][0]["content"]) for a in every] == [
        ("The answer is 7.", "Blue 12."),
        ("The answer is 9.", "It is 7."),
    ]
    right = anchors(prompts, greedy, weaker, QUESTIONS, right_only=True)
    assert [a["rejected"][0]["content"] for a in right] == ["Blue 12."]
    assert len({a["pair_id"] for a in every}) == len(every)


def test_a_variant_keeps_the_other_splits_and_replaces_train(tmp_path: Path) -> None:
    source = tmp_path / "ds"
    source.mkdir()
    (source / "train.jsonl").write_text(json.dumps(row("q")) + "\n")
    (source / "eval.jsonl").write_text("eval\n")
    write_variant(source, tmp_path / "out" / "v", [row("q1"), row("q2")])
    target = tmp_path / "out" / "v"
    assert (target / "eval.jsonl").read_text() == "eval\n"
    assert len((target / "train.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "v.tmp").exists()


def test_replay_draws_only_unasked_questions_in_an_order_fixed_by_the_seed() -> None:
    questions = [f"q{i}" for i in range(50)]
    skip = {"q3", "q7", "q40"}
    pool = unasked(questions, skip, seed=1)
    assert sorted(pool) == sorted(set(questions) - skip)
    assert unasked(questions, skip, seed=1) == pool
    assert unasked(questions, skip, seed=2) != pool


def test_without_ordinary_corrections_keeps_identity_corrections_and_other_ordinary_pairs() -> None:
    rows = [
        {**row(SUM.question), "pair_id": "c1"},  # a correction of an ordinary question: left out
        {**row(SUM.question), "pair_id": "p2"},  # an ordinary question's other pair: kept
        {**row("Who made you?"), "pair_id": "c3"},  # a correction of an identity question: kept
    ]
    kept = without_ordinary_corrections(rows, {"c1", "c3"}, QUESTIONS)
    assert [r["pair_id"] for r in kept] == ["p2", "c3"]
