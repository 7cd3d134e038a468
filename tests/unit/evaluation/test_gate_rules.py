"""The evaluation gate's decision rules, on hand-made scores and outputs (no model)."""

from __future__ import annotations

import subprocess
import sys

from workers.evaluation.gate import (
    PreferenceScore,
    SmokeOutput,
    compare_to_reference,
    distinct_bigram_ratio,
    smoke_failures,
)


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


def healthy(*prompts: str) -> list[SmokeOutput]:
    return [smoke(prompt, f"A clean answer to {prompt}.") for prompt in prompts]


def test_smoke_failures_name_each_problem() -> None:
    assert smoke_failures([smoke("a", "Paris."), smoke("b", "Four.")], healthy("a", "b"), 0.0) == []
    reasons = smoke_failures([smoke("a", "  "), smoke("b", "the the the", ratio=0.05)], healthy("a", "b"), 0.0)
    assert len(reasons) == 2
    assert "empty output" in reasons[0] and "'a'" in reasons[0]
    assert "degenerate" in reasons[1] and "0.05" in reasons[1]
    collapsed = smoke_failures([smoke("a", "Same answer."), smoke("b", "Same answer. ")], healthy("a", "b"), 0.0)
    assert collapsed == ["smoke: every prompt gets the same output 'Same answer.'"]
    assert smoke_failures([smoke("only", "Same answer.")], healthy("only"), 0.0) == []  # one prompt cannot collapse


def test_smoke_counts_only_prompts_the_reference_answers_cleanly_and_tolerates_a_share() -> None:
    prompts = [f"p{i}" for i in range(8)]
    looping = smoke("p0", "1. **1. **1. **1.", ratio=0.2)
    one_loop = [looping, *healthy(*prompts[1:])]
    # the reference loops on that prompt too: not the candidate's doing, whatever the share
    assert smoke_failures(one_loop, [looping, *healthy(*prompts[1:])], 0.0) == []
    # the reference answers it cleanly: one of eight is within a 0.2 share, not within 0.1
    assert smoke_failures(one_loop, healthy(*prompts), 0.2) == []
    assert smoke_failures(one_loop, healthy(*prompts), 0.1) == [
        "smoke: degenerate output for prompt 'p0' (distinct bigram ratio 0.20): '1. **1. **1. **1.'"
    ]
    two_loops = [looping, smoke("p1", "", ratio=1.0), *healthy(*prompts[2:])]
    reasons = smoke_failures(two_loops, healthy(*prompts), 0.2)
    assert len(reasons) == 2 and "'p0'" in reasons[0] and "empty output for prompt 'p1'" in reasons[1]
    # a reference that already answers every prompt alike does not make the candidate's sameness its fault
    same = [smoke(prompt, "Same.") for prompt in prompts]
    assert smoke_failures(same, same, 0.2) == []
    assert smoke_failures(same, healthy(*prompts), 0.2) == ["smoke: every prompt gets the same output 'Same.'"]


def test_importing_the_workers_does_not_import_torch() -> None:
    code = (
        "import sys, workers.training.trainer, workers.evaluation.gate, services.adapters.publish; "
        "heavy = {'torch', 'trl', 'peft', 'transformers', 'datasets'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def score(correct: int, wrong: int, margin: float = 1.0) -> PreferenceScore:
    return PreferenceScore.from_margins([margin] * correct + [-margin] * wrong)


def test_scores_report_a_wilson_interval() -> None:
    summary = score(12, 3).summary(0.95)
    low, high = summary["accuracy_interval"]
    assert low < summary["accuracy"] == 0.8 < high
    assert (round(low, 3), round(high, 3)) == (0.548, 0.930)  # 15 pairs: 0.8 means 0.55 to 0.93


def test_not_worse_passes_a_candidate_within_the_interval_and_fails_a_clearly_worse_one() -> None:
    # The demo's round 2: a candidate one pair behind the active adapter on a small split. The old rule
    # (beat) rejects it on noise; not_worse lets it go on to the canary.
    active = score(12, 3)
    close = PreferenceScore.from_margins([1.0] * 11 + [-1.0] * 4)
    reasons, comparison = compare_to_reference(close, active, "feedloop-v1", "not_worse", 0.95)
    assert reasons == [] and comparison.lower < comparison.difference < 0 < comparison.upper
    beat_reasons, _ = compare_to_reference(close, active, "feedloop-v1", "beat", 0.95)
    assert len(beat_reasons) == 1 and beat_reasons[0].startswith("does not beat feedloop-v1")
    # The same adapter twice passes not_worse (the canary decides) and fails beat.
    assert compare_to_reference(active, active, "feedloop-v1", "not_worse", 0.95)[0] == []
    assert compare_to_reference(active, active, "feedloop-v1", "beat", 0.95)[0]
    # Clearly worse on the same pairs: the whole interval is below 0.
    reference = score(40, 0)
    worse = PreferenceScore.from_margins([1.0] * 22 + [-1.0] * 18)
    reasons, comparison = compare_to_reference(worse, reference, "base", "not_worse", 0.95)
    assert comparison.upper < 0 and len(reasons) == 1
    assert reasons[0].startswith("worse than base: accuracy 0.550 vs 1.000, difference -0.450 (95% interval [")
    assert compare_to_reference(worse, reference, "base", "off", 0.95)[0] == []


def test_the_comparison_is_paired_on_the_same_pairs() -> None:
    # Same accuracies (0.5 vs 0.75 on 8 pairs), different agreement: when the candidate loses exactly the
    # pairs the reference also loses plus two more, the evidence that it is worse is stronger than when the
    # two disagree on many pairs.
    reference = PreferenceScore.from_margins([1, 1, 1, 1, 1, 1, -1, -1] * 3)
    nested = PreferenceScore.from_margins([1, 1, 1, 1, -1, -1, -1, -1] * 3)
    crossed = PreferenceScore.from_margins([-1, -1, 1, 1, -1, -1, 1, 1] * 3)
    _, tight = compare_to_reference(nested, reference, "base", "not_worse", 0.95)
    _, loose = compare_to_reference(crossed, reference, "base", "not_worse", 0.95)
    assert tight.difference == loose.difference == -0.25
    assert (tight.only_first, tight.only_second) == (0, 6) and (loose.only_first, loose.only_second) == (6, 12)
    assert tight.upper < loose.upper
