"""In which written form does a model state a result right? For corpus sums, unit conversions or capitals, the
assistant's answer is started in each form a user could write a correction in, up to the result ("8 plus 6 is"
and "8 + 6 ="; "3 weeks is", "3 weeks =" and "3 weeks is 3 * 7 ="; "The capital of Russia is"), and the model
completes it greedily; the first number it writes (for a capital, the city within its next tokens) is checked.
"own" lets the model answer in its own words (48 tokens) and checks the answer as the demo does. A trained
adapter takes up the corrections' form, so this says which form costs the model its results. ``--adapter``
measures a trained LoRA adapter on top of the model.

    .venv/bin/python bench/answer_forms.py data/models/smollm2-135m-instruct [--kind arithmetic|conversion|capital] \\
        [--adapter DIR] [--questions 240] [--out bench/results/answer-forms.json]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo.corpus import QA, all_questions, is_correct


def result_prefix(written: str, result: str) -> str:
    """The written answer up to its result: "8 plus 6 is 14." -> "8 plus 6 is"; "3 weeks = 21 days." -> "3 weeks ="."""
    return written[: written.rindex(result)].rstrip()


def as_equation(qa: QA) -> str:
    """The corpus's equation for a sum; a conversion's words answer with "is" as "=" ("3 weeks = 21 days.")."""
    return qa.equation or qa.answer.replace(" is ", " = ", 1)


FORMS = {
    "words": lambda qa: result_prefix(qa.answer, qa.expected),
    "equation": lambda qa: result_prefix(as_equation(qa), qa.expected),
    "working": lambda qa: result_prefix(qa.working, qa.expected),
    "own": lambda qa: "",
}
FORMS_OF_KIND = {
    "arithmetic": ("words", "equation", "own"),
    "conversion": ("words", "equation", "working", "own"),
    "capital": ("words", "own"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model folder")
    parser.add_argument("--kind", choices=tuple(FORMS_OF_KIND), default="arithmetic")
    parser.add_argument("--adapter", help="a LoRA adapter folder to measure on top of the model")
    parser.add_argument("--questions", type=int, default=240, help="corpus questions of that kind drawn at random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the counts here (JSON)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model: Any = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    model.eval()
    of_kind = [qa for qa in all_questions() if qa.kind == args.kind]
    drawn: list[QA] = random.Random(args.seed).sample(of_kind, min(args.questions, len(of_kind)))

    def right_from(qa: QA, prefix: str) -> bool:
        chat = [{"role": "user", "content": qa.question}]
        prompt = str(tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
        ids = tokenizer(prompt + prefix, return_tensors="pt").input_ids
        new_tokens = 48 if not prefix else 6 if qa.kind == "capital" else 4
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        completion = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        if not prefix or qa.kind == "capital":
            return is_correct(qa, completion)
        found = re.search(r"-?\d+", completion)
        return found is not None and found.group() == qa.expected

    results = {}
    for form in FORMS_OF_KIND[args.kind]:
        prefix_of = FORMS[form]
        right, start = 0, time.monotonic()
        for done, qa in enumerate(drawn, 1):
            right += right_from(qa, prefix_of(qa))
            if done % 40 == 0 or done == len(drawn):
                rate = done / (time.monotonic() - start)
                print(f"{form}: {done}/{len(drawn)} · {rate:.1f} questions/s · ETA {(len(drawn) - done) / rate:.0f}s")
        results[form] = {"right": right, "of": len(drawn)}
        print(f"{form}: right {right} of {len(drawn)} ({right / len(drawn):.1%})")
    record = {
        "model": args.model,
        "adapter": args.adapter,
        "kind": args.kind,
        "questions": len(drawn),
        "seed": args.seed,
        "forms": results,
    }
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
