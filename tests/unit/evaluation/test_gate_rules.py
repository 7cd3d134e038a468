"""The evaluation gate's decision rules, on hand-made scores and outputs (no model)."""

from __future__ import annotations

import subprocess
import sys

from workers.evaluation.gate import PreferenceScore, SmokeOutput, distinct_bigram_ratio, smoke_failures


def test_accuracy_counts_strictly_positive_margins() -> None:
    score = PreferenceScore.from_margins([1.0, 0.0, -2.0, 3.0])
    assert (score.correct, score.pairs, score.accuracy, score.mean_margin) == (2, 4, 0.5, 0.5)
    assert PreferenceScore.from_margins([]).accuracy == 0.0


def test_beat_is_strict_with_a_margin_tie_break() -> None:
    better = PreferenceScore.from_margins([1.0, 1.0, -1.0])
    worse = PreferenceScore.from_margins([1.0, -1.0, -1.0])
    assert better.beats(worse) and not worse.beats(better)
    # Equal accuracy (common on small splits, and at 1.0): the larger mean margin wins ...
    wider = PreferenceScore.from_margins([5.0, 5.0])
    narrower = PreferenceScore.from_margins([1.0, 1.0])
    assert wider.beats(narrower) and not narrower.beats(wider)
    # ... and an exact tie (the same adapter twice) does not beat.
    assert not wider.beats(PreferenceScore.from_margins([5.0, 5.0]))
    # Accuracy dominates the margin.
    assert PreferenceScore.from_margins([0.1, 0.1]).beats(PreferenceScore.from_margins([50.0, -0.1]))


def test_distinct_bigram_ratio_catches_loops() -> None:
    assert distinct_bigram_ratio([7] * 30) == 1 / 29
    assert distinct_bigram_ratio([1, 2] * 15) == 2 / 29
    assert distinct_bigram_ratio(list(range(30))) == 1.0
    assert distinct_bigram_ratio([5]) == 1.0  # a one-token answer is short, not a loop


def smoke(prompt: str, output: str, ratio: float = 1.0, min_ratio: float = 0.3) -> SmokeOutput:
    return SmokeOutput(prompt, output, len(output.split()), ratio, bool(output.strip()) and ratio >= min_ratio)


def test_smoke_failures_name_each_problem() -> None:
    assert smoke_failures([smoke("a", "Paris."), smoke("b", "Four.")]) == []
    reasons = smoke_failures([smoke("a", "  "), smoke("b", "the the the", ratio=0.05)])
    assert len(reasons) == 2
    assert "empty output" in reasons[0] and "'a'" in reasons[0]
    assert "degenerate" in reasons[1] and "0.05" in reasons[1]
    collapsed = smoke_failures([smoke("a", "Same answer."), smoke("b", "Same answer. ")])
    assert collapsed == ["smoke: every prompt gets the same output 'Same answer.'"]
    assert smoke_failures([smoke("only", "Same answer.")]) == []  # one prompt cannot collapse


def test_importing_the_workers_does_not_import_torch() -> None:
    code = (
        "import sys, workers.training.trainer, workers.evaluation.gate, services.adapters.publish; "
        "heavy = {'torch', 'trl', 'peft', 'transformers', 'datasets'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
