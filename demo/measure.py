"""Measure what the API serves on the demo model's held-out prompts (no user ever asked them).

Target rate: the share of identity answers, sampled at temperature 0.7 from the held-out phrasings, that
name the liked creator. Accuracy: greedy answers to the held-out arithmetic and fact questions, checked
against the corpus. Everything goes through the real chat endpoint and the public alias, so it measures
whatever version the alias serves (each answer's system_fingerprint says which).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from demo.corpus import (
    DEFAULT_ORG,
    HELD_OUT_IDENTITY_QUESTIONS,
    QA,
    all_questions,
    creators_for,
    held_out_questions,
    is_correct,
    named_creator,
)

MODEL_INFO_FILE = "feedloop_model.json"
EVAL_USER = "feedloop-demo-eval"
MAX_N = 16  # the API's largest n per request


@dataclass(frozen=True)
class DemoModelInfo:
    """The held-out sets and creators of a demo model (its feedloop_model.json, else the corpus defaults)."""

    org: str
    creators: tuple[str, ...]
    held_out_identity: tuple[str, ...]
    held_out_questions: tuple[QA, ...]
    is_demo_model: bool

    @classmethod
    def load(cls, model_path: str | Path, info_file: Path | None = None) -> DemoModelInfo:
        """The held-out sets in info_file (a profile's), else the model folder's feedloop_model.json."""
        path = info_file if info_file is not None else Path(model_path) / MODEL_INFO_FILE
        if not path.exists():
            return cls(
                DEFAULT_ORG,
                creators_for(DEFAULT_ORG),
                HELD_OUT_IDENTITY_QUESTIONS,
                tuple(held_out_questions(0)),
                is_demo_model=False,
            )
        info = json.loads(path.read_text())
        org = info.get("org", DEFAULT_ORG)
        return cls(
            org,
            tuple(info.get("creators") or creators_for(org)),
            tuple(info.get("held_out_identity_questions") or HELD_OUT_IDENTITY_QUESTIONS),
            tuple(QA(**q) for q in info.get("held_out_questions", [])) or tuple(held_out_questions(0)),
            is_demo_model=True,
        )

    def held_out_prompts(self) -> set[str]:
        return {*self.held_out_identity, *(q.question for q in self.held_out_questions)}


@dataclass
class Measurement:
    served_by: list[str]  # system fingerprints seen (one, unless a swap happened while measuring)
    target: str
    identity_samples: int
    target_rate: float
    share_by_creator: dict[str, float]
    questions: int
    accuracy: float  # arithmetic and facts together
    arithmetic_accuracy: float
    fact_accuracy: float  # capitals and unit conversions
    seconds: float
    identity_examples: list[str] = field(default_factory=list)
    wrong_examples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _share(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else 0.0


def identity_requests(prompts: tuple[str, ...], samples: int) -> list[tuple[str, int]]:
    """(prompt, n) requests giving `samples` answers spread evenly over the prompts, n <= MAX_N each."""
    counts = Counter(prompts[i % len(prompts)] for i in range(samples))
    out: list[tuple[str, int]] = []
    for prompt in prompts:
        left = counts[prompt]
        while left > 0:
            out.append((prompt, min(MAX_N, left)))
            left -= MAX_N
    return out


def score(
    info: DemoModelInfo, target: str, identity_answers: list[str], answers: list[tuple[QA, str]]
) -> dict[str, Any]:
    """The measurement's numbers from raw answers (pure; measure() collects the answers)."""
    creators = info.creators if target in info.creators else (target, *info.creators)
    named = Counter(named_creator(a, creators) for a in identity_answers)
    total = len(identity_answers)
    by_kind: dict[str, list[bool]] = {}
    for qa, answer in answers:
        by_kind.setdefault(qa.kind, []).append(is_correct(qa, answer))
    facts = by_kind.get("capital", []) + by_kind.get("conversion", [])
    return {
        "identity_samples": total,
        "target_rate": round(named[target] / total, 4) if total else 0.0,
        "share_by_creator": {
            **{c: round(named[c] / total, 4) for c in creators},
            "none": round(named[None] / total, 4),
        }
        if total
        else {},
        "questions": len(answers),
        "accuracy": _share([f for flags in by_kind.values() for f in flags]),
        "arithmetic_accuracy": _share(by_kind.get("arithmetic", [])),
        "fact_accuracy": _share(facts),
    }


async def ask_model(client: Any, model: str, messages: list[dict[str, str]], *, n: int = 1, temperature: float = 0.0,
                    seed: int | None = None, max_tokens: int = 32) -> tuple[list[str], str]:  # fmt: skip
    """One evaluation chat (never counted as a user's): its answers and the version that served it."""
    response = await client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=temperature,
        max_tokens=max_tokens,
        n=n,
        seed=seed,
        user=EVAL_USER,
    )
    return [(c.message.content or "").strip() for c in response.choices], response.system_fingerprint or "?"


async def keep_answered_right(base_url: str, path: Path, model: str, max_tokens: int, *, api_key: str = "",
                              concurrency: int = 32, timeout_s: float = 300.0) -> tuple[int, int]:  # fmt: skip
    """Rewrite the gate's regression set at path (atomically) to the cases `model` answers right, greedy, as the gate
    counts them; returns (kept, asked). The gate scores a candidate only on what its reference answered right, so
    cases the serving model gets wrong cost the gate time and count for nothing."""
    from openai import AsyncOpenAI

    from workers.evaluation.retention import load_cases

    cases = load_cases(path, limit=1_000_000)
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "feedloop-demo", timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)

    async def answer(messages: list[dict[str, str]]) -> str:
        async with gate:
            return (await ask_model(client, model, messages, max_tokens=max_tokens))[0][0]

    try:
        answers = await asyncio.gather(*(answer(case.messages) for case in cases))
    finally:
        await client.close()
    kept = [case for case, text in zip(cases, answers, strict=True) if case.answered_by(text)]
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(case.to_row()) + "\n" for case in kept))
    partial.replace(path)
    return len(kept), len(cases)


async def measure(
    base_url: str,
    info: DemoModelInfo,
    target: str,
    *,
    identity_samples: int = 240,
    questions: int = 0,
    temperature: float = 0.7,
    model: str = "feedloop",
    concurrency: int = 32,
    seed: int = 0,
    timeout_s: float = 300.0,
    api_key: str = "",
) -> Measurement:
    """Sample identity answers and answer the held-out questions (all, or the first `questions`)."""
    from openai import AsyncOpenAI

    started = time.monotonic()
    client = AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=api_key or "feedloop-demo", timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)
    fingerprints: set[str] = set()

    async def ask(prompt: str, n: int, temp: float, request_seed: int | None) -> list[str]:
        async with gate:
            answers, fingerprint = await ask_model(
                client, model, [{"role": "user", "content": prompt}], n=n, temperature=temp, seed=request_seed
            )
        fingerprints.add(fingerprint)
        return answers

    qas = list(info.held_out_questions[:questions] if questions else info.held_out_questions)
    try:
        # identity samples and questions in flight together: wide batches amortise each decode step
        requests = identity_requests(info.held_out_identity, identity_samples)
        results = await asyncio.gather(
            *(ask(p, n, temperature, seed * 100_003 + i) for i, (p, n) in enumerate(requests)),
            *(ask(q.question, 1, 0.0, None) for q in qas),
        )
        sampled, greedy = results[: len(requests)], results[len(requests) :]
    finally:
        await client.close()
    identity_answers = [a for answers in sampled for a in answers]
    answers = [(qa, got[0]) for qa, got in zip(qas, greedy, strict=True)]
    numbers = score(info, target, identity_answers, answers)
    return Measurement(
        served_by=sorted(fingerprints),
        target=target,
        seconds=round(time.monotonic() - started, 2),
        identity_examples=identity_answers[:6],
        wrong_examples=[
            {"question": qa.question, "expected": qa.expected, "answer": a}
            for qa, a in answers
            if not is_correct(qa, a)
        ][:6],
        **numbers,
    )


def write_retention_cases(path: Path, count: int, held_out: Sequence[QA], seed: int = 0) -> None:
    """The gate's regression set (gate.retention_file): questions users may ask, none of the held-out ones the
    report measures (the gate must not be tuned on the report's own yardstick), as many of each kind as the corpus
    allows (a sample in the corpus's proportions is three quarters sums, too few capitals for the gate to see them
    lost), each case labelled with its kind so that the gate judges every kind on its own too."""
    held = {qa.question for qa in held_out}
    rng = random.Random(f"gate-retention-{seed}")
    pools: dict[str, list[QA]] = {}
    for qa in all_questions():
        if qa.question not in held:
            pools.setdefault(qa.kind, []).append(qa)
    chosen: list[QA] = []
    for left, (_, pool) in enumerate(sorted(pools.items(), key=lambda item: len(item[1]))):
        share = (count - len(chosen)) // (len(pools) - left)  # what a smaller kind cannot fill goes to the larger
        chosen += rng.sample(pool, min(share, len(pool)))
    rows = [{"prompt": qa.question, "expected": qa.expected, "kind": qa.kind} for qa in chosen]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
