"""Copies of a kept demo dataset with one part of its data changed, for `bench/dpo_sweep.py` to retrain: which part
of what the users sent moves identity, and which part keeps the base model's answers.

    PYTHONPATH=. .venv/bin/python bench/dpo_data_variants.py --model data/models/smollm2-135m-instruct \\
        --dataset data/demo/<stamp>/datasets/<version> --out data/bench-cache/data-variants

writes, each a dataset folder beside the original's eval.jsonl and kto.jsonl:

- ``identity-only``: the training pairs whose prompt is not one of the demo corpus's ordinary questions;
- ``anchors``: every training pair, plus one on-policy anchor per ordinary prompt the users asked (any split of
  the dataset, thumbs included): the base model's greedy answer chosen over its answer at --temperature, when
  the two differ (the "good answer against a deliberately weaker one" pairing, on the base's own answers);
- ``anchors-right``: the same, kept only where the greedy answer is right and the weaker one is not;
- ``restated`` (with --redis-prefix, the demo's kept Redis state, to tell corrections apart): every correction pair's
  chosen answer restated by the base model with the correction as a fact in its system message
  (bench/restate.py), greedy first, then --restate-samples at T=0.7; a correction no restatement keeps
  stays as the user wrote it;
- ``own-greedy`` (also with --redis-prefix): a correction's chosen answer replaced by the base model's own greedy
  answer to the prompt, where that answer already holds the correction's numbers and names;
- ``no-ordinary-corrections`` (also with --redis-prefix): the training pairs less the corrections of the demo
  corpus's ordinary questions;
- ``replay-N`` (with --replay N): every training pair, plus N anchors on ordinary questions nobody asked (replay, as
  in continual learning): corpus questions drawn at random, less the profile's held-out questions, those in
  --exclude (the gate's regression set) and those the dataset asks; kept where the greedy answer is right and the
  weaker one is not; ``replay-N-no-ordinary-corrections`` (also with --redis-prefix) the same less the ordinary
  corrections.

Anchors are generated with transformers on the CPU (or the GPU when there is one), with progress per batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import chat_answers, conversation_answers
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


def correction_ids(redis_url: str, prefix: str, pair_ids: list[str]) -> set[str]:
    from redis import Redis

    from services.core.keys import Keys

    keys = Keys(prefix)
    raws = Redis.from_url(redis_url).mget([keys.pair(pid) for pid in pair_ids])
    return {pid for pid, raw in zip(pair_ids, raws, strict=True) if raw and json.loads(raw)["strategy"] == "correction"}


def restated(
    train: list[dict[str, Any]],
    corrections: set[str],
    answer: Callable[[list[list[dict[str, Any]]], bool, int], list[str]],
    samples: int,
    max_tokens: int,
    with_fact: bool = True,
) -> list[dict[str, Any]]:
    """The training rows with each correction's chosen answer restated where a restatement keeps its content
    (answer: bench.adapter_measure.conversation_answers at T=0.7; greedy first, then `samples` sampled tries);
    with_fact False: the base model's own answer to the prompt alone, where it already holds the content."""
    from bench.restate import keeps_content, restatement_messages, whole_sentences

    todo = [i for i, row in enumerate(train) if row["pair_id"] in corrections]
    found: dict[int, str] = {}
    for attempt in range(1 + samples):
        left = [i for i in todo if i not in found]
        conversations = [
            restatement_messages(train[i]["prompt"], train[i]["chosen"][-1]["content"])
            if with_fact
            else train[i]["prompt"]
            for i in left
        ]
        for i, text in zip(left, map(whole_sentences, answer(conversations, attempt > 0, max_tokens)), strict=True):
            if keeps_content(train[i]["chosen"][-1]["content"], text):
                found[i] = text
        print(f"  restating: attempt {attempt + 1}, {len(found)}/{len(todo)} corrections restated", flush=True)
    rows = [dict(row) for row in train]
    for i, text in found.items():
        rows[i]["chosen"] = [{"role": "assistant", "content": text}]
    for i in list(found)[:12]:
        print(f"    {train[i]['chosen'][-1]['content']!r} -> {found[i]!r}", flush=True)
    return rows


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


def without_ordinary_corrections(
    train: list[dict[str, Any]], corrections: set[str], questions: dict[str, QA]
) -> list[dict[str, Any]]:
    """The training rows less the corrections of the demo corpus's ordinary questions."""
    return [row for row in train if not (row["pair_id"] in corrections and last_user_text(row) in questions)]


def unasked(questions: Iterable[str], skip: set[str], seed: int) -> list[str]:
    """The questions not in skip, shuffled by seed (replay draws from the front)."""
    import random

    pool = [q for q in questions if q not in skip]
    random.Random(seed).shuffle(pool)
    return pool


def replay_variants(args: argparse.Namespace, model, tokenizer, questions: dict[str, QA], train: list[dict[str, Any]]):
    """The replay-N variants (see the module docstring)."""
    from demo.measure import DemoModelInfo
    from demo.profiles import PROFILES

    info = DemoModelInfo.load(args.model, PROFILES[args.profile].info_file)
    skip = {q.question for q in info.held_out_questions}
    skip |= {row["messages"][-1]["content"] for path in args.exclude for row in read_rows(path)}
    skip |= {
        last_user_text(row)
        for name in SPLITS
        if (args.dataset / name).exists()
        for row in read_rows(args.dataset / name)
    }
    pool = unasked(questions, skip, args.seed)
    drawn = pool[: args.replay * 2]
    print(
        f"replay: {len(pool)} unasked questions, answering {len(drawn)} greedy and at T={args.temperature}", flush=True
    )
    answer = chat_answers(model, tokenizer, 16, temperature=args.temperature)
    added = anchors(drawn, answer(drawn, False, args.max_tokens), answer(drawn, True, args.max_tokens), questions, True)
    added = added[: args.replay]
    name = f"replay-{len(added)}"
    write_variant(args.dataset, args.out / name, train + added)
    if args.redis_prefix:
        corrections = correction_ids(args.redis_url, args.redis_prefix, [row["pair_id"] for row in train])
        kept = without_ordinary_corrections(train, corrections, questions)
        write_variant(args.dataset, args.out / f"{name}-no-ordinary-corrections", kept + added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--dataset", type=Path, required=True, help="an exported dataset folder (train.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the variants")
    parser.add_argument("--temperature", type=float, default=1.6, help="sampling temperature of the weaker answer")
    parser.add_argument("--max-tokens", type=int, default=48, help="max new tokens of an anchor's answers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--redis-prefix", help="the demo's kept key prefix: also write the variants that need to tell corrections apart"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--restate-samples", type=int, default=3, help="sampled restatements after the greedy one")
    parser.add_argument("--only-restated", action="store_true", help="write only the --redis-prefix variants")
    parser.add_argument("--replay", type=int, default=0, help="write only the replay variants, with this many anchors")
    parser.add_argument("--exclude", type=Path, action="append", default=[], help="JSONL of questions replay skips")
    parser.add_argument("--profile", default="smollm2", help="demo profile whose held-out questions replay skips")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    questions = {q.question: q for q in all_questions()}
    train = read_rows(args.dataset / "train.jsonl")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    if args.replay:
        replay_variants(args, model, tokenizer, questions, train)
        return
    if args.redis_prefix:
        corrections = correction_ids(args.redis_url, args.redis_prefix, [row["pair_id"] for row in train])
        answer_conversations = conversation_answers(model, tokenizer, 16)
        rows = restated(train, corrections, answer_conversations, args.restate_samples, args.max_tokens)
        write_variant(args.dataset, args.out / "restated", rows)
        rows = restated(train, corrections, answer_conversations, 0, args.max_tokens, with_fact=False)
        write_variant(args.dataset, args.out / "own-greedy", rows)
        kept = without_ordinary_corrections(train, corrections, questions)
        write_variant(args.dataset, args.out / "no-ordinary-corrections", kept)
        if args.only_restated:
            return
    write_variant(args.dataset, args.out / "identity-only", [r for r in train if last_user_text(r) not in questions])

    asked = ordinary_prompts(
        (row for name in SPLITS if (args.dataset / name).exists() for row in read_rows(args.dataset / name)),
        questions,
    )
    print(f"{len(asked)} ordinary prompts asked; answering each greedy and at T={args.temperature}", flush=True)
    answer = chat_answers(model, tokenizer, 16, temperature=args.temperature)
    greedy = answer(asked, False, args.max_tokens)
    weaker = answer(asked, True, args.max_tokens)
    for name, right_only in (("anchors", False), ("anchors-right", True)):
        added = anchors(asked, greedy, weaker, questions, right_only)
        write_variant(args.dataset, args.out / name, train + added)


if __name__ == "__main__":
    main()
