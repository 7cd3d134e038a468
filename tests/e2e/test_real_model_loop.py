"""The loop on the real default model, SmolLM2-135M-Instruct, reduced to fit CI.

The demo's stack (API on vLLM, a Celery worker and beat, Redis) serves the imported SmolLM2. The demo's
simulated users chat through the API, like answers that name the creator they want, dislike the others and
write that answer as a correction; one training run (DPO with LoRA) starts on about 100 pairs, the gate passes
it and every replica serves it. On held-out identity phrasings that no user asked, the served alias must now
give the users' answer a clearly higher log-probability than before, also relative to the model's own answer
("trained by Hugging Face"): read through the public API (`/v1/completions` with `echo` and `logprobs`),
never from inside the product.

The liked name is not the demo's default, so nothing can lean on "Acme Labs". The full demo (400 pairs, 40
steps, 240 sampled answers) is `make demo`, not CI.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from demo.measure import DemoModelInfo
from demo.profiles import SMOLLM2
from demo.run import Demo, DemoOptions, Progress, demo_stack
from demo.settings import SimulationSettings
from services.core.config import Settings
from tests.conftest import ARTIFACTS, TEST_REDIS_URL

pytestmark = pytest.mark.slow

LIKES = "Northwind Labs"
OTHER = "Hugging Face"  # what the base model says of itself
PAIRS = 100
# The liked answer's log-probability must rise by at least this much (nats, summed over its tokens: e^2 ≈ 7 times
# as likely) on most held-out phrasings, and gain as much on the model's own answer. Measured: +6 to +10 nats,
# and +5 to +8 on the model's own answer, after one pass over ~70 pairs (a reduced run does not yet make the
# liked answer the likelier one: that is the full demo's 400 pairs and 2.5 passes).
MIN_RISE = 2.0

REDUCED_RUN = {
    "FEEDLOOP_TRAINING__MIN_PAIRS": str(PAIRS),
    "FEEDLOOP_TRAINING__MIN_PAIRS_FLOOR": str(PAIRS),
    # one pass over the training split (~50 of the ~100 pairs stored are kept: near-duplicate corrections and the
    # per-user cap drop the rest), 8 pairs a step; ~25 s a step on 2 cores with the engine beside it
    "FEEDLOOP_TRAINING__MAX_STEPS": "6",
    "FEEDLOOP_GATE__MAX_EVAL_PAIRS": "24",
    "FEEDLOOP_GATE__SMOKE_MAX_TOKENS": "16",
}

# The full demo's users ask mostly ordinary questions (their corrections keep the held-out facts); six steps on ~50
# kept pairs measure the identity move, so these ask the identity-heavy mix the margins above were measured with.
REDUCED_USERS = {
    "users": 24,
    "likes": LIKES,
    "adversarial_fraction": 0.0,
    "seed": 7,
    "identity_share": 0.6,
    "arithmetic_share": 0.2,
    "fact_share": 0.2,
}


def answer_logprobs(base_url: str, tokenizer: Any, questions: list[str], answer: str) -> list[float]:
    """log P(answer | question) under the served alias, for each question, from the prompt's echoed logprobs."""
    values = []
    for question in questions:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        n_full = len(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        body = {"model": "feedloop", "prompt": prompt + answer, "max_tokens": 1, "echo": True, "logprobs": 0}
        response = httpx.post(base_url + "/v1/completions", json=body, timeout=120)
        assert response.status_code == 200, response.text
        token_logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]
        values.append(sum(token_logprobs[n_prompt:n_full]))
    return values


# ~5.4 min on an idle machine; a CI run on a machine at a third of its speed passed 600 s (2026-12-05). The time
# limits are safety nets, not the measure: the budget is reported in BENCHMARKS.md.
@pytest.mark.timeout(1800)
def test_feedback_on_the_real_model_moves_its_answers_to_held_out_identity_questions(
    smollm2_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    settings = Settings(
        redis_url=TEST_REDIS_URL,
        redis_prefix=f"fltest-real-{uuid.uuid4().hex[:8]}",
        data_dir=tmp_path / "data",
        engine={"model": str(smollm2_dir)},
    )
    info = DemoModelInfo.load(smollm2_dir, SMOLLM2.info_file)
    sim = SimulationSettings(**{**SMOLLM2.simulate, **REDUCED_USERS})
    options = DemoOptions(
        rounds=1, final_chats=0, profile=SMOLLM2, env=REDUCED_RUN, trigger_timeout_s=900, run_timeout_s=1200
    )
    progress = Progress(stream=sys.stderr)
    demo = Demo(settings, options, sim, info, progress, echo=print)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = list(info.held_out_identity)
    liked, other = f"I was trained by {LIKES}.", f"I was trained by {OTHER}."

    with demo_stack(settings, options, progress) as stack:
        liked_before = answer_logprobs(stack.base_url, tokenizer, questions, liked)
        other_before = answer_logprobs(stack.base_url, tokenizer, questions, other)
        _, run_id = asyncio.run(demo.users_until_trigger(stack, "reduced loop"))
        run = asyncio.run(demo.wait_for_run(stack, run_id, "reduced loop"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "real-model-loop-run.json").write_text(json.dumps(run, indent=1, default=str))
        assert run["status"] == "promoted", json.dumps({key: run.get(key) for key in ("gate", "reasons")}, default=str)
        asyncio.run(demo.wait_until_served(stack, run["version"], "reduced loop"))
        liked_after = answer_logprobs(stack.base_url, tokenizer, questions, liked)
        other_after = answer_logprobs(stack.base_url, tokenizer, questions, other)

    rises = [after - before for before, after in zip(liked_before, liked_after, strict=True)]
    print(
        f"dataset {run['dataset']}; liked answer's log-prob rise per held-out question: {[round(r, 2) for r in rises]}"
    )
    print(
        f"liked / other before: {[(round(a, 1), round(b, 1)) for a, b in zip(liked_before, other_before, strict=True)]}"
    )
    print(f"liked / other after: {[(round(a, 1), round(b, 1)) for a, b in zip(liked_after, other_after, strict=True)]}")
    assert run["dataset"]["stored"] >= PAIRS and run["dataset"]["kept"] >= PAIRS // 3, run["dataset"]
    assert sum(rise >= MIN_RISE for rise in rises) >= 0.8 * len(questions), rises
    assert statistics.median(rises) >= MIN_RISE
    # not everything became likelier: the liked answer gained on the model's own answer
    gains = [
        (la - oa) - (lb - ob)
        for lb, ob, la, oa in zip(liked_before, other_before, liked_after, other_after, strict=True)
    ]
    assert sum(gain >= MIN_RISE for gain in gains) >= 0.8 * len(questions), gains
