"""The default model, SmolLM2-135M-Instruct, served by `feedloop serve` (one server for the module).

FEEDLOOP_ENGINE__MODEL is empty: the server must find the imported model under its data dir. The official
`openai` client talks to it, plain and streaming; and the prompt the engine serves is the prompt TRL's
DPOTrainer trains on (same chat template, same tokens), so feedback on an answer trains that answer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

ModelServer = Any  # tests/integration/models/conftest.py::ModelServer

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(smollm2_server: ModelServer) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=smollm2_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=180)


def test_the_default_model_is_served_from_the_data_dir(smollm2_server: ModelServer, smollm2_dir: Path) -> None:
    state = httpx.get(smollm2_server.base_url + "/admin/engine", headers=smollm2_server.admin_headers()).json()
    assert state["model"] == str(smollm2_server.data_dir / "models" / "smollm2-135m-instruct")
    assert Path(state["model"]).resolve() == smollm2_dir.resolve()


def test_plain_chat_with_the_openai_client(client: Any) -> None:
    r = client.chat.completions.create(
        model="feedloop-base",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
        user="alice",
    )
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 20
    assert r.model_extra["feedback"]["token"], "every completion carries its feedback token"


def test_streaming_chat_with_the_openai_client(client: Any) -> None:
    stream = client.chat.completions.create(
        model="feedloop",
        messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}],
        max_tokens=32,
        temperature=0.3,
        seed=1,
        stream=True,
        stream_options={"include_usage": True},
        user="bob",
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3, "streamed in pieces"
    assert text.strip() and finish in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage is not None and 0 < usage.completion_tokens <= 32
    assert chunks[-1].model_extra["feedback"]["token"]


def test_served_prompt_is_the_prompt_the_trainer_trains_on(client: Any, smollm2_dir: Path) -> None:
    """TRL's DPOTrainer tokenizes a conversational pair exactly as the engine rendered the chat."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize, common_prefix_length

    from workers.evaluation.gate import tokenize_pair

    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="feedloop-base", messages=messages, max_tokens=24, temperature=0)
    served = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    row = {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": served}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    }
    # DPOTrainer's tokenize_fn (trl 1.16, conversational branch)
    prompt_ids = _tokenize(tokenizer, row["prompt"], add_generation_prompt=True)["input_ids"]
    with_chosen = _tokenize(tokenizer, row["prompt"] + row["chosen"])["input_ids"]
    with_rejected = _tokenize(tokenizer, row["prompt"] + row["rejected"])["input_ids"]
    split = min(common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected))

    assert split == len(prompt_ids), "the trainer would cut the served prompt short"
    assert len(prompt_ids) == r.usage.prompt_tokens, "the engine rendered another prompt"
    rendered = tokenizer.decode(prompt_ids)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    # The completion the trainer scores starts with exactly the tokens the engine generated, its stop token
    # (<|im_end|>) included; ChatML then adds the newline between messages, which both chosen and rejected share.
    chosen_ids = with_chosen[split:]
    generated = tokenizer(served, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert chosen_ids[: len(generated)] == generated
    assert len(generated) == r.usage.completion_tokens
    assert tokenizer.decode(chosen_ids[len(generated) :]) == "\n"
    # and the gate scores the same split
    gate_prompt, gate_chosen, _ = tokenize_pair(tokenizer, row, max_length=1024)
    assert gate_prompt == prompt_ids and gate_chosen == chosen_ids
