"""Train one kept demo dataset under several training settings and measure each adapter as the demo and the gate
would: target rate, gate retention and held-out accuracy. A GPU runs a whole grid in minutes; a CPU, one variant.

    .venv/bin/python bench/dpo_sweep.py --model data/models/smollm2-135m-instruct \\
        --dataset data/demo/<stamp>/.../datasets/<version> --retention data/demo/<stamp>/gate-retention.jsonl \\
        --out bench/results/dpo-sweep.jsonl [--only profile,beta-0.3] [--precision fp32|auto]

Each variant is the demo profile's training settings plus the variant's overrides (training.* names; --grid FILE
gives a JSON list of {"name": ..., <setting>: <value>}; "lora_layers": [first, last] limits LoRA to those decoder
layers, a bench-only knob: PEFT's layers_to_transform). Per variant: the real job (workers.training.run_training)
on the dataset's train.jsonl, then, with transformers on the training device:

- target rate: held-out identity phrasings sampled at T=0.7 (--samples), the share naming --likes;
- gate retention: the gate's regression set answered greedy as the gate answers it, scored as the gate scores it
  against the base model's answers (kept / what the base answered right);
- held-out accuracy: the demo's held-out questions, greedy.

--precision fp32 (default) trains in float32 on a GPU too, as the CPU demo trains, so that a GPU sweep predicts a CPU
run; auto is the job's own choice (bf16 on a GPU). Each variant's record is appended to --out as it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.adapter_measure import chat_answers, measure_identity_and_questions
from demo.measure import DemoModelInfo
from demo.profiles import PROFILES
from services.core.config import Settings

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Around the SmolLM2 profile (lr 5e-4, beta 0.1, SFT 0.3, 2.5 passes in steps of 8, r=8 on all linear layers): what
# could keep the base model's answers (beta, learning rate, fewer steps, attention only) against what moves identity.
DEFAULT_GRID: list[dict[str, Any]] = [  # most telling first: a GPU lease may end before the grid does
    {"name": "profile"},
    {"name": "beta-0.3", "beta": 0.3},
    {"name": "beta-0.5", "beta": 0.5},
    {"name": "lr-2.5e-4", "learning_rate": 2.5e-4},
    {"name": "attention", "target_modules": ATTENTION},
    {"name": "sft-1.0", "sft_weight": 1.0},
    {"name": "beta-0.3-sft-1.0", "beta": 0.3, "sft_weight": 1.0},
    {"name": "20-steps", "max_steps": 20, "max_epochs": 0},
    {"name": "40-steps", "max_steps": 40, "max_epochs": 0},  # the profile before it trained 2.5 passes
    {"name": "sft-0.1", "sft_weight": 0.1},
    {"name": "kto", "method": "kto"},
    {"name": "lr-2.5e-4-80-steps", "learning_rate": 2.5e-4, "max_steps": 80, "max_epochs": 0},
    {"name": "beta-1.0", "beta": 1.0},
    {"name": "attention-lr-1e-3", "target_modules": ATTENTION, "learning_rate": 1e-3},
    {"name": "beta-0.5-80-steps", "beta": 0.5, "max_steps": 80, "max_epochs": 0},
    {"name": "lr-1e-4-80-steps", "learning_rate": 1e-4, "max_steps": 80, "max_epochs": 0},
    {"name": "sft-0", "sft_weight": 0.0},
    {"name": "rank-4", "lora_rank": 4, "lora_alpha": 8},
    {"name": "rank-16", "lora_rank": 16, "lora_alpha": 32},
]


def profile_settings(profile: str, model: str, overrides: dict[str, Any]) -> Settings:
    """Settings of the demo profile's FEEDLOOP_* environment, the model, and training overrides."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in PROFILES[profile].env.items():
        section, _, name = key.removeprefix("FEEDLOOP_").lower().partition("__")
        nested.setdefault(section, {})[name] = value
    nested.setdefault("engine", {})["model"] = model
    nested["engine"]["max_lora_rank"] = max(16, int(overrides.get("lora_rank", 8)))
    nested.setdefault("training", {}).update(overrides)
    return Settings(**nested)


@contextlib.contextmanager
def float32_on_gpu() -> Iterator[None]:
    """Train in float32 on a GPU as on the CPU: load the base in float32, no bf16 autocast."""
    import torch
    import trl
    from transformers import AutoModelForCausalLM

    from workers.training import trainer

    if not torch.cuda.is_available():
        yield
        return

    def load_float32(settings: Settings, on_gpu: bool):
        return AutoModelForCausalLM.from_pretrained(
            settings.model_path(), dtype=torch.float32, device_map={"": torch.cuda.current_device()}
        )

    def no_bf16(config_class):
        return lambda **kwargs: config_class(**{**kwargs, "bf16": False})

    saved = trainer._load_base_model, trl.DPOConfig, trl.KTOConfig
    trainer._load_base_model = load_float32  # type: ignore[assignment]
    trl.DPOConfig, trl.KTOConfig = no_bf16(saved[1]), no_bf16(saved[2])  # type: ignore[misc]
    try:
        yield
    finally:
        trainer._load_base_model, trl.DPOConfig, trl.KTOConfig = saved  # type: ignore[misc]


@contextlib.contextmanager
def lora_layers(span: list[int] | None) -> Iterator[None]:
    """LoRA on decoder layers span[0]..span[1] only (PEFT's layers_to_transform); None: every layer."""
    import peft

    if span is None:
        yield
        return
    saved = peft.LoraConfig
    peft.LoraConfig = functools.partial(saved, layers_to_transform=list(range(span[0], span[1] + 1)))  # type: ignore[misc]
    try:
        yield
    finally:
        peft.LoraConfig = saved  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--dataset", type=Path, required=True, help="an exported dataset folder (train.jsonl)")
    parser.add_argument("--retention", type=Path, required=True, help="the gate's regression set (JSONL)")
    parser.add_argument("--profile", default="smollm2", choices=sorted(PROFILES))
    parser.add_argument("--likes", default="Acme Labs", help="the creator the users like")
    parser.add_argument("--grid", type=Path, help="JSON list of variants (default: the built-in grid)")
    parser.add_argument("--only", help="comma-separated variant names to run")
    parser.add_argument("--samples", type=int, default=240, help="identity answers sampled per variant")
    parser.add_argument("--batch", type=int, help="generation batch (default: 256 on a GPU, 16 on a CPU)")
    parser.add_argument("--precision", choices=["fp32", "auto"], default="fp32")
    parser.add_argument("--work", type=Path, default=Path("data/bench-cache/dpo-sweep"))
    parser.add_argument("--out", type=Path, help="append one JSON record per variant here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the job's per-step progress lines

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.evaluation.gate import greedy_answers
    from workers.evaluation.retention import RetentionCase, load_cases, score_retention
    from workers.training.trainer import run_training

    grid = json.loads(args.grid.read_text()) if args.grid else DEFAULT_GRID
    if args.only:
        wanted = args.only.split(",")
        grid = [variant for variant in grid if variant["name"] in wanted]
        if missing := set(wanted) - {variant["name"] for variant in grid}:
            sys.exit(f"no variant named {', '.join(sorted(missing))}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = args.batch or (256 if device == "cuda" else 16)
    info = DemoModelInfo.load(args.model, PROFILES[args.profile].info_file)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    cases = load_cases(args.retention, limit=1_000_000)
    base_settings = profile_settings(args.profile, args.model, {})
    max_tokens = base_settings.gate.retention_max_tokens

    def load_base():
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()

    def retention_of(model) -> list[str]:
        return [
            text for text, _ in greedy_answers(model, tokenizer, [c.messages for c in cases], max_tokens, device, batch)
        ]

    torch.manual_seed(args.seed)
    base = load_base()
    base_answers = retention_of(base)
    base_numbers = measure_identity_and_questions(chat_answers(base, tokenizer, batch), info, args.likes, args.samples)
    del base
    print(
        f"base: target {base_numbers['target_rate']:.1%}, held-out {base_numbers['held_out_accuracy']:.1%}, "
        f"regression cases answered right {sum(map(RetentionCase.answered_by, cases, base_answers))}/{len(cases)}",
        flush=True,
    )
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for index, variant in enumerate(grid):
        overrides = {key: value for key, value in variant.items() if key not in ("name", "lora_layers")}
        settings = profile_settings(args.profile, args.model, overrides)
        if settings.training.method == "kto" and not (args.dataset / "kto.jsonl").is_file():
            print(f"{variant['name']}: skipped, {args.dataset} has no kto.jsonl", flush=True)
            continue
        run_dir = args.work / variant["name"]
        run_started = time.monotonic()
        precision = float32_on_gpu() if args.precision == "fp32" else contextlib.nullcontext()
        with precision, lora_layers(variant.get("lora_layers")):
            result = run_training(settings, args.dataset, run_dir, variant["name"], args.dataset.name)
        train_wall = time.monotonic() - run_started
        torch.manual_seed(args.seed)
        model = PeftModel.from_pretrained(load_base(), result.adapter_dir).eval()
        numbers = measure_identity_and_questions(chat_answers(model, tokenizer, batch), info, args.likes, args.samples)
        retention = score_retention(cases, base_answers, retention_of(model), base_settings.gate.confidence)
        del model
        row = {
            "variant": variant["name"],
            "overrides": {key: value for key, value in variant.items() if key != "name"},
            "device": result.device,
            "dtype": result.dtype if args.precision == "auto" or device == "cpu" else "float32",
            "train_examples": result.train_examples,
            "steps": result.steps,
            "train_runtime_s": round(result.runtime_s, 2),
            "pairs_per_s": round(result.examples_per_s, 3),
            "train_wall_s": round(train_wall, 2),
            "final_metrics": {key: round(value, 4) for key, value in result.metrics.items()},
            "base": {key: base_numbers[key] for key in ("target_rate", "held_out_accuracy")},
            **numbers,
            "retention": round(retention.rate, 4),
            "retention_kept": f"{retention.kept}/{retention.reference_right}",
            "passes_gate_retention": retention.rate >= settings.gate.min_retention,
            "retention_lost": retention.lost,  # the regression cases it lost: question, base answer, its answer
        }
        rows.append(row)
        if args.out:
            with args.out.open("a") as file:
                file.write(json.dumps(row) + "\n")
        done = index + 1
        eta = (time.monotonic() - started) / done * (len(grid) - done)
        print(
            f"[{done}/{len(grid)}] {variant['name']}: target {row['target_rate']:.1%}, "
            f"retention {row['retention']:.3f} ({row['retention_kept']}), held-out {row['held_out_accuracy']:.1%}, "
            f"{result.steps} steps in "
            f"{result.runtime_s:.1f} s ({result.examples_per_s:.2f} pairs/s); ETA {eta:.0f} s",
            flush=True,
        )
    print(f"\n{'variant':<22} {'target':>7} {'retention':>10} {'held-out':>9} {'pairs/s':>8} {'train s':>8}")
    for row in rows:
        print(
            f"{row['variant']:<22} {row['target_rate']:>7.1%} {row['retention']:>10.3f} "
            f"{row['held_out_accuracy']:>9.1%} {row['pairs_per_s']:>8.2f} {row['train_runtime_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
