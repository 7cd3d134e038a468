"""What a trained adapter gains and loses on questions nobody chose for the base model, against the held-out set
that was chosen as what the base model answers right.

    .venv/bin/python bench/regression_churn.py data/models/smollm2-135m-instruct ADAPTER [ADAPTER ...] \\
        [--questions 400] [--tokens 32] [--noise] [--out bench/results/regression-churn.jsonl]

Per model (the base first, then each adapter on it), greedy, transformers on CPU, float32:

- accuracy on --questions corpus questions drawn at random (seeded), none of them in the profile's held-out set,
  scored by the demo's own matcher (demo.corpus.is_correct) at --tokens new tokens;
- for each adapter: the questions it lost (base right, adapter wrong), gained, and the share of the base's right
  answers it kept, which is what the demo's held-out retention measures on a set cut to the base's right answers.

--noise also answers the held-out set with the base model itself, changed only numerically (bf16 weights; one
prompt per batch instead of 16): how far a figure "kept of what the base answered right" moves with no training.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import chat_answers
from demo.corpus import QA, all_questions, is_correct
from demo.measure import DemoModelInfo
from demo.profiles import PROFILES
from workers.evaluation.intervals import paired_difference


def unselected_questions(held_out: set[str], count: int, seed: int) -> list[QA]:
    pool = [qa for qa in all_questions() if qa.question not in held_out]
    return random.Random(f"regression-churn-{seed}").sample(pool, min(count, len(pool)))


def churn(base_right: list[bool], right: list[bool]) -> dict[str, Any]:
    """Lost, gained and kept of two models' right/wrong on the same questions (the gate's paired counts)."""
    paired = paired_difference(right, base_right)
    kept_share = paired.both / max(1, paired.both + paired.only_second)
    return {"lost": paired.only_second, "gained": paired.only_first, "kept_of_base_right": kept_share}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="base model folder")
    parser.add_argument("adapters", nargs="*", help="adapter folders")
    parser.add_argument("--profile", default="smollm2", choices=sorted(PROFILES))
    parser.add_argument("--questions", type=int, default=400)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per answer (the demo measures with 32)")
    parser.add_argument("--noise", action="store_true", help="also the base model's held-out set in bf16 / batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append one JSON record per model here")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    info = DemoModelInfo.load(args.model, PROFILES[args.profile].info_file)
    held_out = list(info.held_out_questions)
    questions = unselected_questions({qa.question for qa in held_out}, args.questions, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def load(dtype=torch.float32):
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

    def right(model, asked: list[QA], batch: int = 16) -> list[bool]:
        answers = chat_answers(model, tokenizer, batch)([qa.question for qa in asked], False, args.tokens)
        return [is_correct(qa, text) for qa, text in zip(asked, answers, strict=True)]

    def report(name: str, asked: list[QA], flags: list[bool], extra: dict[str, Any]) -> None:
        by_kind = {
            kind: round(sum(f for f, qa in zip(flags, asked, strict=True) if qa.kind == kind) / total, 4)
            for kind in sorted({qa.kind for qa in asked})
            if (total := sum(qa.kind == kind for qa in asked))
        }
        record = {"model": name, "questions": len(flags), "tokens": args.tokens,
                  "accuracy": round(sum(flags) / len(flags), 4), "by_kind": by_kind, **extra}  # fmt: skip
        print(json.dumps(record), flush=True)
        if args.out:
            with args.out.open("a") as file:
                file.write(json.dumps(record) + "\n")

    started = time.monotonic()
    base_right = right(load(), questions)
    report("base", questions, base_right, {})
    for adapter in args.adapters:
        flags = right(PeftModel.from_pretrained(load(), adapter).eval(), questions)
        report(adapter, questions, flags, churn(base_right, flags))
    if args.noise:
        reference = right(load(), held_out)
        for name, flags in (
            ("base, bf16, held-out set", right(load(torch.bfloat16), held_out)),
            ("base, one prompt per batch, held-out set", right(load(), held_out, batch=1)),
        ):
            report(name, held_out, flags, {"reference": "base, float32, batch 16", **churn(reference, flags)})
    print(f"{time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
