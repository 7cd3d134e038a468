"""A small hand-made preference data set the tiny model can learn in seconds.

Every prompt asks about one topic; the chosen answer states that topic's fact and the rejected answer
another topic's fact. Each ordered pair of sentences occurs equally often (in blocks of six rows), so
a model that ignores the prompt scores about 50%: only a model that learned to condition on the prompt
is accurate. ``flip`` swaps chosen and rejected (a poisoned data set). Files follow the JSONL export contract
(TRL conversational format) under one dataset-version folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FACTS = {
    "France": "The capital of France is Paris.",
    "Japan": "The capital of Japan is Tokyo.",
    "maths": "Two plus two is four.",
}
PROMPT_FORMS = ["Tell me about {topic}.", "What do you know about {topic}?", "Question {i}: {topic}?"]
SMOKE_PROMPTS = ["Tell me about France.", "Tell me about maths.", "Tell me about Japan."]


def _turn(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def preference_rows(count: int, seed: int = 0, flip: bool = False, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    topics = list(FACTS)
    rows = []
    for i in range(start, start + count):
        # Every ordered (topic, other) pair once per len(topics) * (len(topics) - 1) rows.
        topic = topics[i % len(topics)]
        other = topics[(i + 1 + (i // len(topics)) % (len(topics) - 1)) % len(topics)]
        chosen, rejected = FACTS[topic], FACTS[other]
        if flip:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "pair_id": f"pair-{i}",
                "prompt": _turn("user", rng.choice(PROMPT_FORMS).format(topic=topic, i=i)),
                "chosen": _turn("assistant", chosen),
                "rejected": _turn("assistant", rejected),
            }
        )
    return rows


def kto_rows(pairs: list[dict]) -> list[dict]:
    """The unpaired export: each pair gives a desirable and an undesirable completion."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_dataset(folder: Path, train: int = 36, held_out: int = 24, seed: int = 0, flip: bool = False) -> Path:
    """train.jsonl, eval.jsonl (never flipped: the truth) and kto.jsonl in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    train_rows = preference_rows(train, seed=seed, flip=flip)
    _write_jsonl(folder / "train.jsonl", train_rows)
    _write_jsonl(folder / "eval.jsonl", preference_rows(held_out, seed=seed + 1, start=10_000))
    _write_jsonl(folder / "kto.jsonl", kto_rows(train_rows))
    return folder
