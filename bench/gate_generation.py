"""The gate's greedy answers at two batch sizes, side by side: seconds and whether the answers are the same.

    .venv/bin/python bench/gate_generation.py                       # SmolLM2 (imported on first use), 150 questions
    .venv/bin/python bench/gate_generation.py --sizes 8,32 --rounds 2

The gate answers its regression set (and its smoke prompts) twice per candidate, greedy, through the candidate's
LoRA adapter and through the reference: on a CPU that is most of its time. This times
workers.evaluation.gate.greedy_answers on the demo's regression set (gate.retention_file as `feedloop demo` writes
it: 150 questions, 50 per kind, --max-tokens each) through a LoRA adapter on every linear layer (random weights,
r=8, so that the adapter's cost is in the numbers and the answers are not the base model's), one round per size,
the sizes alternating so that a machine's drift hits both. Writes bench/results/gate_generation.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "gate_generation.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="model folder (default: the default base model, SmolLM2)")
    parser.add_argument("--sizes", default="8,32", help="batch sizes to compare")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per size, alternating")
    parser.add_argument("--questions", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=48, help="gate.retention_max_tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from demo.measure import write_retention_cases
    from services.core.config import Settings
    from workers.evaluation.gate import greedy_answers
    from workers.evaluation.retention import load_cases

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model_path = args.model
    if not model_path:
        from services.cli.models import ensure_default_model

        model_path = ensure_default_model(Settings())
    with tempfile.TemporaryDirectory() as tmp:
        cases_file = Path(tmp) / "retention.jsonl"
        write_retention_cases(cases_file, args.questions, held_out=[])
        cases = load_cases(str(cases_file), args.questions)
    conversations = [case.messages for case in cases]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, lora).eval()

    sizes = [int(size) for size in args.sizes.split(",")]
    seconds: dict[int, list[float]] = {size: [] for size in sizes}
    answers: dict[int, list[str]] = {}
    for round_index in range(args.rounds):
        for size in sizes if round_index % 2 == 0 else reversed(sizes):
            started = time.perf_counter()
            with torch.no_grad():
                got = greedy_answers(model, tokenizer, conversations, args.max_tokens, "cpu", batch_size=size)
            seconds[size].append(time.perf_counter() - started)
            answers.setdefault(size, [text for text, _ in got])
            print(f"round {round_index + 1}: batch {size}: {seconds[size][-1]:.1f} s", flush=True)

    first = sizes[0]
    rows = [
        {
            "batch_size": size,
            "median_s": round(statistics.median(seconds[size]), 1),
            "runs_s": [round(s, 1) for s in seconds[size]],
            "speedup_vs_first": round(statistics.median(seconds[first]) / statistics.median(seconds[size]), 2),
            "answers_same_as_first": sum(a == b for a, b in zip(answers[first], answers[size], strict=True)),
        }
        for size in sizes
    ]
    print(f"| batch | median s | runs | speed-up over batch {first} | answers the same |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['batch_size']} | {row['median_s']} | {row['runs_s']} | {row['speedup_vs_first']} | "
            f"{row['answers_same_as_first']}/{len(conversations)} |"
        )
    summary = {
        "command": "bench/gate_generation.py " + " ".join(sys.argv[1:]),
        "model": model_path,
        "questions": len(conversations),
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
