"""Measure one trained adapter at several strengths (its LoRA update scaled by s, as in weight-space interpolation
between the base model and the fine-tuned one): the demo's target rate and held-out accuracy, and the gate's
retention, for each s. Does a weaker adapter keep the base model's answers while still moving identity?

    .venv/bin/python bench/adapter_strength.py data/models/smollm2-135m-instruct \\
        data/demo/<stamp>/adapters/feedloop-v1 --retention data/demo/<stamp>/gate-retention.jsonl \\
        --strengths 1,0.75,0.5 [--out bench/results/adapter-strength.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import chat_answers, measure_identity_and_questions
from demo.measure import DemoModelInfo
from demo.profiles import PROFILES


def strength_setter(model) -> Callable[[float], None]:
    """set(s): scale every LoRA update of the PEFT model to s times its trained size (s=0: the base model)."""
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    full = [dict(layer.scaling) for layer in layers]

    def set_strength(strength: float) -> None:
        for layer, scaling in zip(layers, full, strict=True):
            layer.scaling.update({name: value * strength for name, value in scaling.items()})

    return set_strength


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="base model folder")
    parser.add_argument("adapter", help="adapter folder")
    parser.add_argument("--retention", type=Path, required=True, help="the gate's regression set (JSONL)")
    parser.add_argument("--strengths", default="1,0.75,0.5")
    parser.add_argument("--profile", default="smollm2", choices=sorted(PROFILES))
    parser.add_argument("--likes", default="Acme Labs", help="the creator the users like")
    parser.add_argument("--samples", type=int, default=96, help="identity answers sampled per strength")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="append one JSON record per strength here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.core.config import GateSettings
    from workers.evaluation.gate import retention_answers
    from workers.evaluation.retention import load_cases, score_retention

    torch.set_num_threads(args.threads)
    gate = GateSettings()  # answered and scored as the gate does by default
    info = DemoModelInfo.load(args.model, PROFILES[args.profile].info_file)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cases = load_cases(args.retention, limit=1_000_000)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    base_answers = retention_answers(
        model, tokenizer, cases, gate.retention_max_tokens, "cpu", gate.generation_batch_size
    )
    model = PeftModel.from_pretrained(model, args.adapter).eval()
    set_strength = strength_setter(model)
    for strength in [float(s) for s in args.strengths.split(",")]:
        set_strength(strength)
        started = time.monotonic()
        torch.manual_seed(args.seed)
        numbers = measure_identity_and_questions(chat_answers(model, tokenizer, 16), info, args.likes, args.samples)
        answers = retention_answers(
            model, tokenizer, cases, gate.retention_max_tokens, "cpu", gate.generation_batch_size
        )
        retention = score_retention(cases, base_answers, answers, gate.confidence)
        row = {
            "adapter": args.adapter,
            "strength": strength,
            **numbers,
            "retention": round(retention.rate, 4),
            "retention_kept": f"{retention.kept}/{retention.reference_right}",
            "seconds": round(time.monotonic() - started, 1),
        }
        print(
            f"strength {strength}: target {row['target_rate']:.1%} {row['named']}, retention {row['retention']:.3f} "
            f"({row['retention_kept']}), held-out {row['held_out_accuracy']:.1%}, {row['seconds']:.0f} s",
            flush=True,
        )
        if args.out:
            with args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
