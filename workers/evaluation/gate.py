"""The evaluation gate: a trained adapter must prefer the held-out chosen answers and still generate sanely.

Pure logic (paths in, a JSON-serialisable result out); the Celery task wraps it. Heavy imports stay
inside functions.

Preference accuracy is measured with the policy's log-prob margin,
``log p(chosen | prompt) - log p(rejected | prompt)`` summed over the completion tokens, the prompt
rendered with the model tokenizer's chat template exactly as in training and serving. A pair counts as
correct when the margin is > 0. Unlike DPO's implicit reward, this needs no reference model, so the
candidate, the active adapter and the base model are scored on the same scale.

Every accuracy is reported with its Wilson interval (``gate.confidence``, 95% by default): on the few
dozen held-out pairs of a young deployment an accuracy of 0.77 means anything from about 0.6 to 0.9.

Comparison with the reference (the active adapter, or the base model when none is active), both scored
on the same pairs (``gate.compare_to_active``):

* ``not_worse`` (default): the candidate fails only when it is less accurate than the reference with
  confidence ``gate.confidence``: the upper end of Newcombe's paired interval on
  ``accuracy(candidate) - accuracy(reference)`` is below 0 (workers/evaluation/intervals.py). A candidate
  that is not worse within that interval goes on (to the canary, where live votes decide): demanding a
  strict win on ~15 pairs rejected good second rounds on noise.
* ``beat``: the candidate must be *strictly* more accurate or, at equal accuracy, have a strictly
  larger mean margin (an exact tie, e.g. the same adapter twice, fails). For deployments without a
  canary that want the old, stricter bar.
* ``off``: no comparison.

``gate.min_accuracy`` stays a floor on the point estimate: the adapter must have learned its data.

Smoke check: greedy generation on ``gate.smoke_prompts``, by the candidate and by the reference. A prompt the
candidate answers empty or in a loop (share of distinct token bigrams < ``gate.smoke_min_distinct_ratio``)
while the reference does not counts against it; the candidate fails on more than ``gate.smoke_max_failed_share``
of the prompts, or when it gives the same text for every prompt (a collapsed model answers everything alike) and
the reference does not. A broken adapter loops everywhere; one greedy answer that falls into a loop the base
model itself starts (SmolLM2 opens a list with "1. **1. **") is a single prompt's accident, not a broken adapter.

Retention (``gate.retention_file``, workers/evaluation/retention.py): of the regression cases the reference
answers right, the candidate must still answer at least ``gate.min_retention`` right (``gate.retention_rule``
kept); or, under ``non_inferior``, on all of them, gains counted, it must be shown to be at most
``gate.retention_margin`` less accurate than the reference. Cases may carry a kind; then each kind is checked too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.adapters.manifest import adapter_version_name
from services.core.config import GateSettings, Settings
from services.core.repetition import degenerate, distinct_bigram_ratio
from services.core.runtime import quiet_progress_bars, served_tokenizer, use_cpu_threads
from workers.evaluation.intervals import PairedComparison, paired_difference, wilson
from workers.evaluation.retention import RetentionCase, load_cases, retention_failures, score_retention
from workers.pairing.exports import load_preference_rows

logger = logging.getLogger(__name__)

CANDIDATE = "candidate"
ACTIVE = "active"


@dataclass
class PreferenceScore:
    accuracy: float
    correct: int
    pairs: int
    mean_margin: float
    margins: list[float] = field(default_factory=list)

    @classmethod
    def from_margins(cls, margins: list[float]) -> PreferenceScore:
        correct = sum(margin > 0 for margin in margins)
        pairs = len(margins)
        return cls(
            accuracy=correct / pairs if pairs else 0.0,
            correct=correct,
            pairs=pairs,
            mean_margin=sum(margins) / pairs if pairs else 0.0,
            margins=margins,
        )

    def beats(self, other: PreferenceScore) -> bool:
        if self.correct != other.correct:
            return self.correct > other.correct
        return self.mean_margin > other.mean_margin

    def correct_pairs(self) -> list[bool]:
        return [margin > 0 for margin in self.margins]

    def summary(self, confidence: float = 0.95) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_interval": list(wilson(self.correct, self.pairs, confidence)),
            "correct": self.correct,
            "pairs": self.pairs,
            "mean_margin": self.mean_margin,
        }


def compare_to_reference(
    candidate: PreferenceScore, reference: PreferenceScore, reference_name: str, mode: str, confidence: float
) -> tuple[list[str], PairedComparison]:
    """The comparison rule (``gate.compare_to_active``): reasons to fail (none to pass), and the paired interval."""
    comparison = paired_difference(candidate.correct_pairs(), reference.correct_pairs(), confidence)
    if mode == "beat" and not candidate.beats(reference):
        return [
            f"does not beat {reference_name}: accuracy {candidate.accuracy:.3f} vs {reference.accuracy:.3f}, "
            f"mean margin {candidate.mean_margin:.3f} vs {reference.mean_margin:.3f}"
        ], comparison
    if mode == "not_worse" and comparison.upper < 0:
        return [
            f"worse than {reference_name}: accuracy {candidate.accuracy:.3f} vs {reference.accuracy:.3f}, "
            f"difference {comparison.difference:+.3f} ({confidence:.0%} interval "
            f"[{comparison.lower:+.3f}, {comparison.upper:+.3f}] on {candidate.pairs} pairs)"
        ], comparison
    return [], comparison


@dataclass
class SmokeOutput:
    prompt: str
    output: str
    tokens: int
    distinct_bigram_ratio: float
    ok: bool


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def smoke_failures(candidate: list[SmokeOutput], reference: list[SmokeOutput], max_failed_share: float) -> list[str]:
    """Why the candidate fails the smoke check against the reference's answers to the same prompts (none: passes)."""
    failed = [mine for mine, theirs in zip(candidate, reference, strict=True) if not mine.ok and theirs.ok]
    reasons = []
    if len(failed) > max_failed_share * len(candidate):
        for smoke in failed:
            if not smoke.output.strip():
                reasons.append(f"smoke: empty output for prompt {smoke.prompt!r}")
            else:
                reasons.append(
                    f"smoke: degenerate output for prompt {smoke.prompt!r} "
                    f"(distinct bigram ratio {smoke.distinct_bigram_ratio:.2f}): {smoke.output[:80]!r}"
                )
    if _collapsed(candidate) and not _collapsed(reference):
        reasons.append(f"smoke: every prompt gets the same output {candidate[0].output.strip()[:80]!r}")
    return reasons


def _collapsed(outputs: list[SmokeOutput]) -> bool:
    return len(outputs) > 1 and len({smoke.output.strip() for smoke in outputs}) == 1


def _render_ids(tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool, tools=None) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])


def tokenize_pair(tokenizer, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as TRL's DPOTrainer builds them: the completion starts where the
    rendered prompt and the rendered prompt+completion diverge; prompt+completion keeps its start."""
    tools = row.get("tools")
    prompt = _render_ids(tokenizer, row["prompt"], add_generation_prompt=True, tools=tools)
    with_chosen = _render_ids(tokenizer, row["prompt"] + row["chosen"], add_generation_prompt=False, tools=tools)
    with_rejected = _render_ids(tokenizer, row["prompt"] + row["rejected"], add_generation_prompt=False, tools=tools)
    split = min(_common_prefix(prompt, with_chosen), _common_prefix(prompt, with_rejected))
    prompt = prompt[:split]
    room = max(max_length - len(prompt), 1)
    return prompt, with_chosen[split:][:room], with_rejected[split:][:room]


def _common_prefix(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def completion_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, device) -> list[float]:
    """Sum of log p(completion token | prefix) for each (prompt_ids, completion_ids)."""
    import torch

    width = max(len(prompt) + len(completion) for prompt, completion in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(sequences):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        completion_mask[row, len(prompt) : len(ids)] = True
    input_ids, attention, completion_mask = (
        input_ids.to(device),
        attention.to(device),
        completion_mask.to(device),
    )
    logits = model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
    totals = []
    for row in range(len(sequences)):  # one row at a time: a full-vocab fp32 log-softmax per batch is large
        row_logprobs = logits[row, :-1].float().log_softmax(-1)
        token_logprobs = row_logprobs.gather(-1, input_ids[row, 1:, None]).squeeze(-1)
        totals.append(float(token_logprobs[completion_mask[row, 1:]].sum()))
    return totals


def score_preferences(model, pairs, pad_id: int, batch_size: int, device) -> PreferenceScore:
    """Preference accuracy and margins of the model's currently active adapter (or base)."""
    margins: list[float] = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        sequences = [(prompt, chosen) for prompt, chosen, _ in batch]
        sequences += [(prompt, rejected) for prompt, _, rejected in batch]
        logprobs = completion_logprobs(model, sequences, pad_id, device)
        margins.extend(c - r for c, r in zip(logprobs[: len(batch)], logprobs[len(batch) :], strict=True))
    return PreferenceScore.from_margins(margins)


def greedy_answers(
    model, tokenizer, conversations: list[list[dict[str, Any]]], max_new_tokens: int, device, batch_size: int = 8
) -> list[tuple[str, list[int]]]:
    """The model's greedy answer to each conversation: its text and its token ids without special tokens.
    Conversations go batch_size at a time, left-padded (a CPU generates a batch for little more than one)."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    special = set(tokenizer.all_special_ids)
    answers: list[tuple[str, list[int]]] = []
    for start in range(0, len(conversations), batch_size):
        rendered = [
            _render_ids(tokenizer, c, add_generation_prompt=True) for c in conversations[start : start + batch_size]
        ]
        width = max(len(ids) for ids in rendered)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rendered], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rendered], device=device)
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, width:].tolist()
        for row in generated:
            if eos in row:  # a finished answer is padded to the longest one in its batch
                row = row[: row.index(eos)]
            content = [token for token in row if token not in special]
            answers.append((tokenizer.decode(content, skip_special_tokens=True), content))
    return answers


def smoke_generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, min_ratio: float, device, batch_size: int
):
    outputs = []
    conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
    answers = greedy_answers(model, tokenizer, conversations, max_new_tokens, device, batch_size)
    for prompt, (text, content) in zip(prompts, answers, strict=True):
        ratio = distinct_bigram_ratio(content)
        outputs.append(
            SmokeOutput(
                prompt=prompt,
                output=text,
                tokens=len(content),
                distinct_bigram_ratio=ratio,
                ok=not degenerate(text, content, min_ratio),
            )
        )
    return outputs


def retention_answers(
    model, tokenizer, cases: list[RetentionCase], max_new_tokens: int, device, batch_size: int
) -> list[str]:
    conversations = [c.messages for c in cases]
    return [text for text, _ in greedy_answers(model, tokenizer, conversations, max_new_tokens, device, batch_size)]


def _use(model, adapter: str | None):
    """Context: run the model with one named adapter, or with adapters disabled (the base)."""
    import contextlib

    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return contextlib.nullcontext()


def _measure(model, tokenizer, gate: GateSettings, pairs, cases: list[RetentionCase], pad_id: int, device):
    """What the gate measures of one model (candidate or reference): its preference scores on the held-out pairs,
    its smoke answers and its answers to the regression set."""
    batch = gate.generation_batch_size
    score = score_preferences(model, pairs, pad_id, gate.eval_batch_size, device)
    smoke = smoke_generate(
        model, tokenizer, gate.smoke_prompts, gate.smoke_max_tokens, gate.smoke_min_distinct_ratio, device, batch
    )
    answers = retention_answers(model, tokenizer, cases, gate.retention_max_tokens, device, batch)
    return score, smoke, answers


def evaluate_adapter(
    settings: Settings,
    adapter_dir: Path | str,
    eval_jsonl: Path | str,
    active_adapter_dir: Path | str | None = None,
) -> GateResult:
    """Gate one candidate adapter on a held-out DPO split (see the module docstring for the rules)."""
    gate = settings.gate
    started = time.monotonic()
    rows = load_preference_rows(Path(eval_jsonl))[: gate.max_eval_pairs]
    reference_name = adapter_version_name(Path(active_adapter_dir)) if active_adapter_dir else "base"
    metrics: dict[str, Any] = {"eval_pairs": len(rows), "reference": reference_name}
    if not rows:
        return GateResult(False, [f"no held-out pairs in {eval_jsonl}"], metrics)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_progress_bars()
    on_gpu = torch.cuda.is_available()
    use_cpu_threads(settings, on_gpu)
    device = torch.device("cuda" if on_gpu else "cpu")
    model_path = settings.model_path()
    try:
        tokenizer = served_tokenizer(settings)  # score as the engine renders (and the trainer trained)
    except OSError as error:
        return GateResult(False, [str(error)], metrics)
    base = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch.bfloat16 if on_gpu else torch.float32, device_map={"": str(device)}
    )
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=CANDIDATE)
        if active_adapter_dir:
            model.load_adapter(str(active_adapter_dir), adapter_name=ACTIVE)
    except Exception as error:  # a corrupt or mismatched adapter fails here, and that is the gate's answer
        return GateResult(False, [f"adapter does not load: {type(error).__name__}: {error}"], metrics)
    model.eval()
    try:
        cases = load_cases(gate.retention_file, gate.max_retention_cases) if gate.retention_file else []
    except (OSError, ValueError) as error:  # an unreadable regression set must not wave candidates through
        return GateResult(False, [f"gate.retention_file unusable: {error}"], metrics)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = [tokenize_pair(tokenizer, row, settings.training.max_length) for row in rows]

    with torch.no_grad():
        with _use(model, CANDIDATE):
            candidate, smoke, candidate_answers = _measure(model, tokenizer, gate, pairs, cases, pad_id, device)
        with _use(model, ACTIVE if active_adapter_dir else None):
            reference, reference_smoke, reference_answers = _measure(
                model, tokenizer, gate, pairs, cases, pad_id, device
            )

    reasons = []
    if candidate.accuracy < gate.min_accuracy:
        reasons.append(
            f"accuracy {candidate.accuracy:.3f} ({candidate.correct}/{candidate.pairs}) "
            f"below gate.min_accuracy {gate.min_accuracy}"
        )
    compared, comparison = compare_to_reference(
        candidate, reference, reference_name, gate.compare_to_active, gate.confidence
    )
    reasons.extend(compared)
    if any(math.isnan(margin) for margin in candidate.margins):
        reasons.append("NaN log-probs under the candidate adapter")
    reasons.extend(smoke_failures(smoke, reference_smoke, gate.smoke_max_failed_share))
    retention = score_retention(cases, reference_answers, candidate_answers, gate.confidence) if cases else None
    if retention is not None:
        rule, margin = gate.retention_rule, gate.retention_margin
        reasons.extend(retention_failures(retention, rule, gate.min_retention, margin, reference_name, gate.kept_floor))
    metrics.update(
        candidate=candidate.summary(gate.confidence),
        reference_score=reference.summary(gate.confidence),
        comparison=comparison.to_dict(),
        margins=[round(margin, 4) for margin in candidate.margins],
        smoke=[asdict(output) for output in smoke],
        reference_smoke=[asdict(output) for output in reference_smoke],
        retention=retention.to_dict() if retention is not None else None,
        rule={
            "min_accuracy": gate.min_accuracy,
            "compare_to_active": gate.compare_to_active,
            "confidence": gate.confidence,
            "smoke_min_distinct_ratio": gate.smoke_min_distinct_ratio,
            "smoke_max_failed_share": gate.smoke_max_failed_share,
            "retention_rule": gate.retention_rule if cases else None,
            "min_retention": gate.min_retention if cases and gate.retention_rule == "kept" else None,
            "retention_margin": gate.retention_margin if cases and gate.retention_rule == "non_inferior" else None,
        },
        runtime_s=time.monotonic() - started,
    )
    passed = not reasons
    logger.info(
        "gate %s: %s accuracy %.3f [%.3f, %.3f] vs %s %.3f, difference %+.3f [%+.3f, %+.3f], margin %.3f vs %.3f%s",
        adapter_dir,
        "PASS" if passed else "FAIL",
        candidate.accuracy,
        *wilson(candidate.correct, candidate.pairs, gate.confidence),
        reference_name,
        reference.accuracy,
        comparison.difference,
        comparison.lower,
        comparison.upper,
        candidate.mean_margin,
        reference.mean_margin,
        "" if passed else f": {'; '.join(reasons)}",
    )
    del model, base
    if on_gpu:
        torch.cuda.empty_cache()
    return GateResult(passed, reasons, metrics)
