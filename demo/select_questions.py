"""Choose a base model's held-out question set: questions it answers correctly (greedy), never asked by users.

Retention is measured on these: after training, the share still answered correctly. Run against a served
base model; writes the profile file the demo reads (held-out identity phrasings, questions, creators). A question
is kept only if the base answers it right in every pass (--passes, each in another order), so that a borderline
greedy answer that may differ with the batch it lands in does not start the baseline below 100%.

    python -m demo.select_questions --api http://127.0.0.1:8000 --out demo/profiles/smollm2.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from demo.corpus import HELD_OUT_IDENTITY_QUESTIONS, QA, all_questions, is_correct

# How many candidates are tried and kept per kind; the kept ones are the profile's held-out questions.
CANDIDATES = {"arithmetic": 240, "capital": 120, "conversion": 120}
KEEP = {"arithmetic": 55, "capital": 45, "conversion": 40}
MAX_TOKENS = 32  # what demo.measure asks with


def candidates(seed: int) -> list[QA]:
    rng = random.Random(f"select-{seed}")
    questions = all_questions()
    chosen: list[QA] = []
    for kind, count in CANDIDATES.items():
        pool = [q for q in questions if q.kind == kind]
        chosen += rng.sample(pool, min(count, len(pool)))
    return chosen


async def answers(api: str, model: str, questions: list[QA]) -> list[str]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=api.rstrip("/") + "/v1", api_key="feedloop-demo", timeout=300)
    gate = asyncio.Semaphore(32)
    done = 0
    started = time.monotonic()

    async def ask(q: QA) -> str:
        nonlocal done
        async with gate:
            r = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": q.question}], temperature=0, max_tokens=MAX_TOKENS
            )
        done += 1
        if done % 50 == 0:
            rate = done / (time.monotonic() - started)
            print(f"  {done}/{len(questions)} answered, {rate:.1f}/s, ETA {(len(questions) - done) / rate:.0f} s")
        return (r.choices[0].message.content or "").strip()

    try:
        return await asyncio.gather(*(ask(q) for q in questions))
    finally:
        await client.close()


def right_in_every_pass(
    questions: list[QA], passes: int, answer: Callable[[list[QA]], list[str]], seed: int = 0
) -> list[bool]:
    """Per question: answered right in each of `passes` passes, the first in the given order, the others shuffled."""
    right = [True] * len(questions)
    for index in range(max(1, passes)):
        order = list(range(len(questions)))
        if index:
            random.Random(f"pass-{seed}-{index}").shuffle(order)
        got = answer([questions[i] for i in order])
        for i, text in zip(order, got, strict=True):
            right[i] = right[i] and is_correct(questions[i], text)
    return right


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="feedloop-base")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--creators", default="Hugging Face,OpenAI,Meta,Google,Microsoft,Anthropic,Mistral AI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=2, help="keep a question answered right in every pass")
    args = parser.parse_args()
    questions = candidates(args.seed)
    right = right_in_every_pass(questions, args.passes, lambda qs: asyncio.run(answers(args.api, args.model, qs)))
    kept: list[QA] = []
    for kind, count in KEEP.items():
        kept += [q for q, ok in zip(questions, right, strict=True) if q.kind == kind and ok][:count]
    by_kind = {k: sum(q.kind == k for q in kept) for k in KEEP}
    tried = {k: sum(q.kind == k for q in questions) for k in KEEP}
    correct = {k: sum(q.kind == k and ok for q, ok in zip(questions, right, strict=True)) for k in KEEP}
    print(f"base correct: {correct} of {tried}; kept {by_kind}")
    profile = {
        "creators": [c.strip() for c in args.creators.split(",") if c.strip()],
        "held_out_identity_questions": list(HELD_OUT_IDENTITY_QUESTIONS),
        "held_out_questions": [asdict(q) for q in kept],
        "selection": {
            "model": args.model,
            "max_tokens": MAX_TOKENS,
            "passes": args.passes,
            "tried": tried,
            "correct": correct,
        },
    }
    args.out.write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
    main()
