"""Measure one adapter offline, without serving it: the demo's held-out identity target rate (sampled, T=0.7)
and held-out question accuracy (greedy), with transformers on CPU. For adapters the gate refused (they are
never served, so the demo report cannot show what they learned).

    .venv/bin/python bench/adapter_measure.py data/models/smollm2-135m-instruct data/demo/<stamp>/adapters/feedloop-v1
    .venv/bin/python bench/adapter_measure.py data/models/smollm2-135m-instruct base     # the base model
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.corpus import is_correct, named_creator
from demo.measure import DemoModelInfo
from demo.profiles import PROFILES


def conversation_answers(
    model, tokenizer, batch: int, temperature: float = 0.7
) -> Callable[[list[list[dict[str, Any]]], bool, int], list[str]]:
    """answer(conversations, sample, max_new_tokens): the model's reply to each conversation (chat messages),
    in left-padded batches, `temperature` when sampling."""
    import torch

    tokenizer.padding_side = "left"

    def answer(conversations: list[list[dict[str, Any]]], sample: bool, max_new_tokens: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(conversations), batch):
            texts = [
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                for messages in conversations[start : start + batch]
            ]
            encoded = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
            with torch.no_grad():
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=sample,
                    temperature=temperature if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                )
            out += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
            print(f"  {len(out)}/{len(conversations)} answered", file=sys.stderr, flush=True)
        return out

    return answer


def chat_answers(model, tokenizer, batch: int, temperature: float = 0.7) -> Callable[[list[str], bool, int], list[str]]:
    """answer(prompts, sample, max_new_tokens): conversation_answers for one user turn each."""
    answer = conversation_answers(model, tokenizer, batch, temperature)
    return lambda prompts, sample, max_new_tokens: answer(
        [[{"role": "user", "content": p}] for p in prompts], sample, max_new_tokens
    )


def measure_identity_and_questions(
    answer: Callable[[list[str], bool, int], list[str]], info: DemoModelInfo, likes: str, samples: int
) -> dict[str, Any]:
    """The demo's two report numbers for one model: target rate on held-out identity phrasings, held-out accuracy."""
    identity = [info.held_out_identity[i % len(info.held_out_identity)] for i in range(samples)]
    names = [named_creator(text, (likes, *info.creators)) for text in answer(identity, True, 48)]
    questions = list(info.held_out_questions)
    answers = answer([q.question for q in questions], False, 32)
    right = [is_correct(q, text) for q, text in zip(questions, answers, strict=True)]
    return {
        "target_rate": names.count(likes) / len(names),
        "samples": len(names),
        "named": {str(name): names.count(name) for name in dict.fromkeys(names)},
        "held_out_accuracy": sum(right) / len(right),
        "held_out_questions": len(right),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="base model folder")
    parser.add_argument("adapter", help="adapter folder, or 'base'")
    parser.add_argument("--profile", default="smollm2", choices=sorted(PROFILES))
    parser.add_argument("--likes", default="Acme Labs", help="the creator the users like")
    parser.add_argument("--samples", type=int, default=96, help="identity answers sampled")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    info = DemoModelInfo.load(args.model, PROFILES[args.profile].info_file)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter != "base":
        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()

    started = time.monotonic()
    result = measure_identity_and_questions(chat_answers(model, tokenizer, 16), info, args.likes, args.samples)
    print(
        f"{args.adapter}: target rate {result['target_rate']:.1%} of {result['samples']} samples {result['named']}; "
        f"held-out accuracy {result['held_out_accuracy']:.1%} of {result['held_out_questions']}; "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
