"""Copies of a kept demo dataset with one part of its data changed, for `bench/dpo_sweep.py` to retrain: which part
of what the users sent moves identity, and which part keeps the base model's answers.

    PYTHONPATH=. .venv/bin/python bench/dpo_data_variants.py --model data/models/smollm2-135m-instruct \\
        --dataset data/demo/<stamp>/datasets/<version> --out data/bench-cache/data-variants

writes, each a dataset folder beside the original's eval.jsonl and kto.jsonl:

- ``identity-only``: the training pairs whose prompt is not one of the demo corpus's ordinary questions;
- ``anchors``: every training pair, plus one on-policy anchor per ordinary prompt the users asked (any split of
  the dataset, thumbs included): the base model's greedy answer chosen over its answer at --temperature, when
  the two differ (the "good answer against a deliberately weaker one" pairing, on the base's own answers);
- ``anchors-right``: the same, kept only where the greedy answer is right and the weaker one is not.

Anchors are generated with transformers on the CPU (or the GPU when there is one), with progress per batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import chat_answers
from demo.corpus import QA, all_questions, is_correct

SPLITS = ("train.jsonl", "eval.jsonl", "kto.jsonl")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_user_text(row: dict[str, Any]) -> str:
    prompt = row["prompt"]
    return prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)


def ordinary_prompts(rows: Iterable[dict[str, Any]], questions: dict[str, QA]) -> list[str]:
    """The corpus questions the rows ask, each once, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        text = last_user_text(row)
        if text in questions:
            seen.setdefault(text)
    return list(seen)


def anchor_pair(prompt: str, chosen: str, rejected: str, index: int) -> dict[str, Any]:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "pair_id": f"anchor-{index:05d}",
    }


def anchors(
    prompts: list[str], greedy: list[str], weaker: list[str], questions: dict[str, QA], right_only: bool
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for prompt, good, bad in zip(prompts, greedy, weaker, strict=True):
        if good.strip() == bad.strip():
            continue
        if right_only and not (is_correct(questions[prompt], good) and not is_correct(questions[prompt], bad)):
            continue
        out.append(anchor_pair(prompt, good, bad, len(out)))
    return out


def write_variant(source: Path, target: Path, train: list[dict[str, Any]]) -> None:
    """A dataset folder: the source's other splits, this train split (written to a temp folder, then renamed)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SPLITS[1:]:
        if (source / name).exists():
            shutil.copy2(source / name, tmp / name)
    (tmp / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"{target}: {len(train)} training pairs", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--dataset", type=Path, required=True, help="an exported dataset folder (train.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the variants")
    parser.add_argument("--temperature", type=float, default=1.6, help="sampling temperature of the weaker answer")
    parser.add_argument("--max-tokens", type=int, default=48, help="max new tokens of an anchor's answers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    questions = {q.question: q for q in all_questions()}
    train = read_rows(args.dataset / "train.jsonl")
    write_variant(args.dataset, args.out / "identity-only", [r for r in train if last_user_text(r) not in questions])

    asked = ordinary_prompts(
        (row for name in SPLITS if (args.dataset / name).exists() for row in read_rows(args.dataset / name)),
        questions,
    )
    print(f"{len(asked)} ordinary prompts asked; answering each greedy and at T={args.temperature}", flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    answer = chat_answers(model, tokenizer, 16, temperature=args.temperature)
    greedy = answer(asked, False, args.max_tokens)
    weaker = answer(asked, True, args.max_tokens)
    for name, right_only in (("anchors", False), ("anchors-right", True)):
        added = anchors(asked, greedy, weaker, questions, right_only)
        write_variant(args.dataset, args.out / name, train + added)


if __name__ == "__main__":
    main()
