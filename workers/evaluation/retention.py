"""The gate's retention check: what the serving model answered right, the candidate must still answer right.

Preference accuracy on held-out pairs says the adapter learned its data; it says nothing about the rest of
what the model knows. A DPO run on a few hundred identity pairs can move the target behaviour and quietly
break arithmetic (measured on SmolLM2-135M: held-out facts and sums answered right fell from 100% to 78%
while the gate passed on preference accuracy).

``gate.retention_file`` is a JSONL regression set the operator owns, one case per line::

    {"messages": [{"role": "user", "content": "What is 7 times 8?"}], "expected": "56"}
    {"prompt": "Name the capital of Peru.", "expected": ["Lima"], "kind": "capital"}

The gate answers every case greedily with the reference (the active adapter, or the base model) and with
the candidate. An answer is right when it contains one of the expected strings as a whole word
(case-insensitive; "5" is not found in "15", and "8,000" reads as "8000"). Of the
cases the reference answers right, the share the candidate still answers right is the retention.

``gate.retention_rule`` says what fails a candidate:

* ``kept`` (default): retention below ``gate.min_retention``. Cases the reference gets wrong are reported, not
  counted: the check guards what serves today, it does not grade the model.
* ``non_inferior``: every case counts, what the candidate newly gets right against what it loses, and the
  lower end of the paired interval on accuracy(candidate) - accuracy(reference) (confidence ``gate.confidence``)
  must be at least ``-gate.retention_margin``: the candidate is shown to be at most that much less accurate. For a
  model whose right answers are fragile, a set of the questions it happens to answer right can only lose:
  SmolLM2-135M answers about a third of the demo's corpus questions right, and an adapter that answered 66% of
  400 of them right (23 lost, 151 gained) kept only 83% of the base model's right ones (BENCHMARKS.md).
  Gains can then pay for any loss; ``gate.kept_floor`` (0: off) also fails a candidate that keeps less than that
  share of the reference's right cases.

An optional ``"kind"`` names the group a case belongs to (capitals, arithmetic, ...). When the set has more than
one kind, each kind is checked on its own as well as the whole set, so that gains on one kind cannot hide a loss on
another (measured: an adapter went from 68 to 112 of 150 right, most of them sums, while its held-out capitals and
unit conversions fell to 61% kept). Under ``kept`` each kind must keep ``gate.min_retention`` of its right cases.
Under ``non_inferior`` a kind fails when it is shown to be worse (the upper end of its interval is below 0) and its
drop is larger than the margin: a few dozen cases cannot show that a kind is *within* 5 points (with 50 cases, 40
right under both models, the interval is already [-0.057, +0.057]), so a per-kind non-inferiority test would refuse
a candidate identical to the reference; a clear loss on a kind is what this catches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from workers.evaluation.intervals import PairedComparison, paired_difference, wilson

UNLABELLED = "(no kind)"  # the group of cases without a kind, in a set where others have one


@dataclass(frozen=True)
class RetentionCase:
    messages: list[dict[str, str]]
    expected: tuple[str, ...]
    kind: str = ""  # the group the case is judged in besides the whole set; "" for none

    def to_row(self) -> dict[str, Any]:
        """The case as a line of gate.retention_file."""
        row: dict[str, Any] = {"messages": self.messages, "expected": list(self.expected)}
        return {**row, "kind": self.kind} if self.kind else row

    def answered_by(self, text: str) -> bool:
        folded = _folded(text)
        return any(re.search(rf"(?<!\w){re.escape(_folded(item))}(?!\w)", folded) for item in self.expected)


def _folded(text: str) -> str:
    """Case-folded, with digit groups joined: "8,000" and "8 000" (thin or no-break space) read as "8000"."""
    return _DIGIT_GROUP.sub("", text).casefold()


_DIGIT_GROUP = re.compile(r"(?<=\d)[,\u00a0\u202f](?=\d{3}(?!\d))")


def parse_case(row: Any, where: str) -> RetentionCase:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a case is a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of chat messages")
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = [{"role": "user", "content": row["prompt"]}]
    else:
        raise ValueError(f"{where}: a case needs 'messages' or a non-empty 'prompt'")
    expected = row.get("expected")
    items = [expected] if isinstance(expected, str) else expected
    if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise ValueError(f"{where}: 'expected' must be a non-empty string or list of strings")
    kind = row.get("kind", "")
    if not isinstance(kind, str):
        raise ValueError(f"{where}: 'kind' must be a string")
    return RetentionCase([dict(m) for m in messages], tuple(items), kind.strip())


def load_cases(path: Path | str, limit: int) -> list[RetentionCase]:
    cases = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                cases.append(parse_case(orjson.loads(line), f"{path}:{number}"))
            if len(cases) >= limit:
                break
    return cases


@dataclass
class RetentionScore:
    cases: int
    reference_right: int
    kept: int  # right under the reference and still right under the candidate
    gained: int  # wrong under the reference, right under the candidate
    rate: float  # kept / reference_right (1.0 when the reference got nothing right)
    interval: tuple[float, float]
    accuracy: PairedComparison  # candidate vs reference accuracy on every case, paired
    lost: list[dict[str, str]] = field(default_factory=list)  # a few lost cases, for the run's report
    by_kind: dict[str, RetentionScore] = field(default_factory=dict)  # each kind's own score (2+ kinds only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_retention(
    cases: Sequence[RetentionCase],
    reference_answers: Sequence[str],
    candidate_answers: Sequence[str],
    confidence: float,
    show: int = 20,
) -> RetentionScore:
    right_before = [case.answered_by(text) for case, text in zip(cases, reference_answers, strict=True)]
    right_after = [case.answered_by(text) for case, text in zip(cases, candidate_answers, strict=True)]
    lost = [
        {"question": case.messages[-1].get("content", ""), "before": before_text, "after": after_text}
        for case, before, after, before_text, after_text in zip(
            cases, right_before, right_after, reference_answers, candidate_answers, strict=True
        )
        if before and not after
    ][:show]
    score = _score(right_before, right_after, confidence, lost)
    kinds = sorted({case.kind for case in cases})
    if len(kinds) > 1:
        score.by_kind = {
            kind or UNLABELLED: _score(
                [b for case, b in zip(cases, right_before, strict=True) if case.kind == kind],
                [a for case, a in zip(cases, right_after, strict=True) if case.kind == kind],
                confidence,
                [],
            )
            for kind in kinds
        }
    return score


def _score(
    right_before: list[bool], right_after: list[bool], confidence: float, lost: list[dict[str, str]]
) -> RetentionScore:
    reference_right = sum(right_before)
    kept = sum(before and after for before, after in zip(right_before, right_after, strict=True))
    gained = sum(after and not before for before, after in zip(right_before, right_after, strict=True))
    return RetentionScore(
        cases=len(right_before),
        reference_right=reference_right,
        kept=kept,
        gained=gained,
        rate=kept / reference_right if reference_right else 1.0,
        interval=wilson(kept, reference_right, confidence),
        accuracy=paired_difference(right_after, right_before, confidence),
        lost=lost,
    )


def retention_failures(
    score: RetentionScore,
    rule: str,
    min_retention: float,
    margin: float,
    reference_name: str,
    kept_floor: float = 0.0,
) -> list[str]:
    """Why the candidate fails the retention check under ``rule`` (gate.retention_rule): the whole set's reasons
    first, then each failing kind's; empty when it passes. ``kept_floor`` (gate.kept_floor) applies under
    non_inferior."""
    whole_set = _whole_set_failure(score, rule, min_retention, margin, reference_name)
    reasons = [whole_set] if whole_set else []
    if rule == "non_inferior" and score.rate < kept_floor:
        reasons.append(
            f"retention {score.rate:.3f} ({score.kept}/{score.reference_right} of the regression cases "
            f"{reference_name} answers right, {score.gained} gained) below gate.kept_floor {kept_floor}"
        )
    for kind, part in score.by_kind.items():
        paired = part.accuracy
        if rule == "non_inferior" and paired.upper < 0 and paired.difference < -margin:
            reasons.append(
                f"regression kind {kind!r} is worse than under {reference_name}: accuracy {paired.difference:+.3f} "
                f"(interval [{paired.lower:+.3f}, {paired.upper:+.3f}]; {paired.only_second} lost, "
                f"{paired.only_first} gained of {part.cases}), beyond -gate.retention_margin {-margin:+.3f}"
            )
        elif rule != "non_inferior" and part.rate < min_retention:
            reasons.append(
                f"regression kind {kind!r}: retention {part.rate:.3f} ({part.kept}/{part.reference_right} of the "
                f"cases {reference_name} answers right) below gate.min_retention {min_retention}"
            )
    return reasons


def _whole_set_failure(
    score: RetentionScore, rule: str, min_retention: float, margin: float, reference_name: str
) -> str | None:
    if rule == "non_inferior":
        paired = score.accuracy
        if paired.lower >= -margin:
            return None
        return (
            f"regression accuracy {paired.difference:+.3f} against {reference_name} (interval [{paired.lower:+.3f}, "
            f"{paired.upper:+.3f}]; {paired.only_second} cases lost, {paired.only_first} gained of {score.cases}): "
            f"the lower end is below -gate.retention_margin {-margin:+.3f}"
        )
    if score.rate >= min_retention:
        return None
    return (
        f"retention {score.rate:.3f} ({score.kept}/{score.reference_right} of the regression cases {reference_name} "
        f"answers right; interval [{score.interval[0]:.3f}, {score.interval[1]:.3f}]) below gate.min_retention "
        f"{min_retention}"
    )
