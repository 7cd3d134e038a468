"""Held-out accuracy of the base model, the base model rounded to bf16, and trained adapters, on one or more held-out
question sets (profile files written by demo.select_questions): how much of a set's loss is the model changing at
all, and how much the training.

    .venv/bin/python bench/held_out_sets.py data/models/smollm2-135m-instruct [ADAPTER ...] \\
        --sets demo/profiles/smollm2.json OLD.json [--system PROMPT ...] [--out bench/results/held-out-sets.jsonl]

--system PROMPT (repeatable) adds the float32 base model asked with that system message instead of its chat
template's default one: how much of a set moves when only the instruction in front of the question changes.

Per set and model: greedy answers, transformers on CPU, float32 (bf16 for the rounded base), 32 new tokens as the
demo measures, scored by the demo's matcher (demo.corpus.is_correct); the share right, per kind, and for models other
than the base the questions lost and gained against the float32 base.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import conversation_answers
from bench.regression_churn import churn
from demo.corpus import QA, is_correct
from demo.measure import DemoModelInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="base model folder")
    parser.add_argument("adapters", nargs="*", help="adapter folders")
    parser.add_argument("--sets", type=Path, nargs="+", required=True, help="profile files with held_out_questions")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system", action="append", default=[], help="also the base with this system message")
    parser.add_argument("--out", type=Path, help="append one JSON record per set and model here")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sets = {str(path): list(DemoModelInfo.load(args.model, path).held_out_questions) for path in args.sets}

    def base(dtype=torch.float32) -> Any:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)

    # (name, load, system message: None for the chat template's default)
    models: list[tuple[str, Any, str | None]] = [
        ("base", base, None),
        ("base, bf16", lambda: base(torch.bfloat16), None),
    ]
    models += [(f"base, system message {system!r}", base, system) for system in args.system]
    for adapter in args.adapters:
        models.append((adapter, lambda adapter=adapter: PeftModel.from_pretrained(base(), adapter), None))

    def right(model: Any, asked: list[QA], system: str | None) -> list[bool]:
        before = [{"role": "system", "content": system}] if system is not None else []
        conversations = [[*before, {"role": "user", "content": qa.question}] for qa in asked]
        answers = conversation_answers(model, tokenizer, 16)(conversations, False, args.tokens)
        return [is_correct(qa, text) for qa, text in zip(asked, answers, strict=True)]

    started = time.monotonic()
    base_right: dict[str, list[bool]] = {}
    for index, (name, load, system) in enumerate(models):
        model = load().eval()
        for set_name, asked in sets.items():
            flags = right(model, asked, system)
            base_right.setdefault(set_name, flags)
            by_kind = {
                kind: f"{sum(f for f, qa in zip(flags, asked, strict=True) if qa.kind == kind)}/{total}"
                for kind in sorted({qa.kind for qa in asked})
                if (total := sum(qa.kind == kind for qa in asked))
            }
            record = {
                "set": set_name,
                "model": name,
                "questions": len(flags),
                "accuracy": round(sum(flags) / len(flags), 4),
                "by_kind": by_kind,
                **({} if name == "base" else churn(base_right[set_name], flags)),
            }
            print(json.dumps(record), flush=True)
            if args.out:
                with args.out.open("a") as file:
                    file.write(json.dumps(record) + "\n")
        del model
        elapsed = time.monotonic() - started
        print(
            f"[{index + 1}/{len(models)}] {name} done, {elapsed:.0f} s, "
            f"ETA {elapsed / (index + 1) * (len(models) - index - 1):.0f} s",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
