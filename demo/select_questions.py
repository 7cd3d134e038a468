"""Choose a base model's held-out question set: questions it answers correctly, never asked by users.

Retention is measured on these: after training, the share still answered correctly. Run against a served
base model; writes the profile file the demo reads (held-out identity phrasings, questions, creators). A question
is kept only if the base answers it right greedy in every pass (--passes, each in another order), so that a
borderline greedy answer that may differ with the batch it lands in does not start the baseline below 100%, and in
at least --min-sampled of --samples answers sampled at --temperature, so that the set holds what the base model
knows rather than answers that any change of its weights (bf16 rounding included) would flip.

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
CANDIDATES = {"arithmetic": 480, "capital": 150, "conversion": 320}
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


async def answers(api: str, model: str, questions: list[QA], temperature: float = 0.0, n: int = 1) -> list[list[str]]:
    """Each question's n answers (greedy when temperature is 0), asked concurrently through the API."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=api.rstrip("/") + "/v1", api_key="feedloop-demo", timeout=300)
    gate = asyncio.Semaphore(32)
    done = 0
    started = time.monotonic()

    async def ask(q: QA) -> list[str]:
        nonlocal done
        async with gate:
            r = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": q.question}],
                temperature=temperature,
                n=n,
                max_tokens=MAX_TOKENS,
            )
        done += 1
        if done % 50 == 0:
            rate = done / (time.monotonic() - started)
            print(f"  {done}/{len(questions)} answered, {rate:.1f}/s, ETA {(len(questions) - done) / rate:.0f} s")
        return [(choice.message.content or "").strip() for choice in sorted(r.choices, key=lambda c: c.index)]

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


def sampled_right_share(questions: list[QA], answer: Callable[[list[QA]], list[list[str]]]) -> list[float]:
    """Per question: the share of its sampled answers that are right."""
    return [
        sum(is_correct(q, text) for text in texts) / max(1, len(texts))
        for q, texts in zip(questions, answer(questions), strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="feedloop-base")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--creators", default="Hugging Face,OpenAI,Meta,Google,Microsoft,Anthropic,Mistral AI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=2, help="keep a question answered right in every greedy pass")
    parser.add_argument("--samples", type=int, default=8, help="answers sampled per question (0: greedy passes only)")
    parser.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled answers")
    parser.add_argument("--min-sampled", type=float, default=0.5, help="least share of samples right")
    args = parser.parse_args()
    questions = candidates(args.seed)
    right = right_in_every_pass(
        questions, args.passes, lambda qs: [texts[0] for texts in asyncio.run(answers(args.api, args.model, qs))]
    )
    shares = [1.0 if ok else 0.0 for ok in right]
    if args.samples:  # only what the greedy passes kept is worth sampling
        greedy_right = [i for i, ok in enumerate(right) if ok]
        sampled = sampled_right_share(
            [questions[i] for i in greedy_right],
            lambda qs: asyncio.run(answers(args.api, args.model, qs, args.temperature, args.samples)),
        )
        for i, share in zip(greedy_right, sampled, strict=True):
            shares[i] = share
    known = [ok and share >= args.min_sampled for ok, share in zip(right, shares, strict=True)]
    kept: list[QA] = []
    for kind, count in KEEP.items():
        kept += [q for q, ok in zip(questions, known, strict=True) if q.kind == kind and ok][:count]

    def per_kind(flags: list[bool]) -> dict[str, int]:
        return {k: sum(q.kind == k and flag for q, flag in zip(questions, flags, strict=True)) for k in KEEP}

    tried, correct, robust = per_kind([True] * len(questions)), per_kind(right), per_kind(known)
    by_kind = {k: sum(q.kind == k for q in kept) for k in KEEP}
    # how many of the greedy-right questions reach each share of right samples: what another --min-sampled keeps
    at_least = {
        f"{step / max(1, args.samples):.3f}": per_kind(
            [ok and s >= step / max(1, args.samples) for ok, s in zip(right, shares, strict=True)]
        )
        for step in range(1, max(1, args.samples) + 1)
    }
    print(f"base right greedy: {correct}, also in samples: {robust}, of {tried}; kept {by_kind}")
    print(f"greedy-right questions by least share of right samples: {at_least}")
    profile = {
        "creators": [c.strip() for c in args.creators.split(",") if c.strip()],
        "held_out_identity_questions": list(HELD_OUT_IDENTITY_QUESTIONS),
        "held_out_questions": [asdict(q) for q in kept],
        "selection": {
            "model": args.model,
            "max_tokens": MAX_TOKENS,
            "passes": args.passes,
            "samples": args.samples,
            "temperature": args.temperature,
            "min_sampled": args.min_sampled,
            "tried": tried,
            "correct": correct,
            "correct_in_samples": robust,
            "greedy_right_by_sampled_share": at_least,
            "sampled_share": {q.question: share for q, ok, share in zip(questions, right, shares, strict=True) if ok},
        },
    }
    args.out.write_text(json.dumps(profile, indent=1) + "\n")


if __name__ == "__main__":
    main()
