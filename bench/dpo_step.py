"""DPO training throughput: preference pairs/s of the real training job (workers.training.run_training).

    .venv/bin/python bench/dpo_step.py                          # CPU, the tiny test model
    .venv/bin/python bench/dpo_step.py --gpu-shape llama-8b     # GPU: a Llama-3.1-8B-shaped model

CPU: the tiny random Llama (hidden 128, 2 layers), synthetic pairs of ~--prompt-tokens + --answer-tokens
tokens per sequence, fp32, torch threads from training.cpu_threads (--threads).

GPU (--gpu-shape llama-8b): a Llama-3.1-8B-shaped model (hidden 4096, 32 layers, GQA 32/8 heads,
intermediate 14336, vocab 128256) with random bf16 weights, built once into --cache and loaded by
the job like any served model; LoRA r=16 on all seven linear layers, 1,024-token sequences (512
prompt + 512 answer tokens, chosen and rejected), bf16, gradient checkpointing as configured.
Reports pairs/s, tokens/s, peak GPU memory and MFU against the GPU's dense bf16 peak.

MFU counts model FLOPs, not hardware FLOPs: per token, the policy forward (2·N), the policy backward
for activation gradients only (2·N; the base weights are frozen, LoRA's own weight gradients are
negligible) and the reference forward (2·N): 6·N, plus causal attention 3 · 2·L·s·d. N counts the
matmul parameters (all linear layers incl. lm_head, not the embedding lookup). The recompute of
gradient checkpointing is not counted, as usual for MFU.

Throughput is the steady state: the time between the end of the warm-up steps and the last step,
from the job's own per-step progress records.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.core.config import Settings
from workers.training.trainer import run_training

REPO = Path(__file__).resolve().parent.parent
# Dense bf16 peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}
LLAMA_8B_SHAPE = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
WORDS = [
    "the",
    "capital",
    "of",
    "France",
    "is",
    "Paris",
    "Japan",
    "Tokyo",
    "two",
    "plus",
    "four",
    "seven",
    "times",
    "six",
    "forty",
    "water",
    "boils",
    "at",
    "one",
    "hundred",
    "degrees",
    "a",
    "kilometre",
    "thousand",
    "metres",
    "thank",
    "you",
    "goodbye",
    "see",
    "soon",
    "what",
    "else",
    "would",
    "like",
    "to",
    "know",
]


def build_llama_8b_shaped(target: Path) -> Path:
    """Random bf16 weights in the Llama-3.1-8B shape, built on the GPU, saved once (about 16 GB)."""
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from demo.tinymodel import _SEED_TEXT, build_tokenizer, write_atomically

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer(_SEED_TEXT * 4, vocab_size=512)
        end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        config = LlamaConfig(
            **LLAMA_8B_SHAPE, bos_token_id=None, eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id
        )
        torch.manual_seed(0)
        with torch.device("cuda"):  # initialised on the GPU, in bf16: seconds, not minutes, for 8B
            model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
        del model
        torch.cuda.empty_cache()

    return write_atomically(build, target)


def synthetic_text(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random words cut to exactly ``tokens`` tokens of this tokenizer (re-encoding may shift it by one)."""
    words: list[str] = []
    while len(tokenizer(" ".join(words)).input_ids) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(max(8, tokens // 4)))
    ids = tokenizer(" ".join(words)).input_ids[:tokens]
    return tokenizer.decode(ids)


def write_pairs(folder: Path, tokenizer, pairs: int, prompt_tokens: int, answer_tokens: int, seed: int) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as file:
        for _ in range(pairs):
            row = {
                "prompt": [{"role": "user", "content": synthetic_text(rng, tokenizer, prompt_tokens)}],
                "chosen": [{"role": "assistant", "content": synthetic_text(rng, tokenizer, answer_tokens)}],
                "rejected": [{"role": "assistant", "content": synthetic_text(rng, tokenizer, answer_tokens)}],
            }
            file.write(json.dumps(row) + "\n")
    return folder


def matmul_params(config) -> int:
    """Parameters that take part in matmuls per token: every linear layer and lm_head (not embeddings)."""
    hidden, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    attention = hidden * hidden * 2 + hidden * kv * 2  # q, o + k, v
    mlp = 3 * hidden * inter
    return layers * (attention + mlp) + hidden * config.vocab_size


def model_flops_per_token(config, seq_len: int) -> float:
    forward = 2 * matmul_params(config) + 2 * config.num_hidden_layers * seq_len * config.hidden_size
    return 3.0 * forward  # policy forward + policy activation-gradient backward + reference forward


def steady_state(history: list[dict], pairs_per_step: int, warmup_steps: int) -> dict[str, float]:
    warm = history[max(1, min(warmup_steps, len(history) - 1)) - 1] if len(history) > 1 else None
    last = history[-1]
    if warm is None or last["step"] == warm["step"]:
        return {
            "pairs_per_s": pairs_per_step * last["step"] / last["elapsed_s"],
            "steady_steps": last["step"],
        }
    steps = last["step"] - warm["step"]
    seconds = last["elapsed_s"] - warm["elapsed_s"]
    return {"pairs_per_s": steps * pairs_per_step / seconds, "steady_steps": steps, "step_s": seconds / steps}


def pairs_per_cpu_second(cpu_marks: dict[int, float], pairs_per_step: int, warmup_steps: int) -> float:
    """Steady-state pairs per second of process CPU time (all threads): what the CPU would do if idle."""
    steps = sorted(cpu_marks)
    first = steps[min(max(warmup_steps, 1), len(steps) - 1) - 1] if len(steps) > 1 else steps[0]
    last = steps[-1]
    if last == first:
        return 0.0
    return (last - first) * pairs_per_step / (cpu_marks[last] - cpu_marks[first])


def gpu_peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in BF16_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu-shape", choices=["llama-8b"], help="benchmark a random-weight model of this shape")
    parser.add_argument("--model", help="CPU: a model folder or packaged name (smollm2); default: the tiny test model")
    parser.add_argument("--pairs", type=int, help="training pairs (default: 128 CPU, 96 GPU)")
    parser.add_argument("--batch", type=int, help="pairs per optimizer step (default: 16)")
    parser.add_argument("--micro", type=int, help="pairs per forward (default: 16 CPU, 4 GPU)")
    parser.add_argument("--prompt-tokens", type=int, help="prompt tokens (default: 48 CPU, 512 GPU)")
    parser.add_argument("--answer-tokens", type=int, help="answer tokens (default: 48 CPU, 512 GPU)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default: 8 CPU, 16 GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (training.cpu_threads)")
    parser.add_argument("--cpu-bf16", action="store_true", help="CPU: bf16 autocast (training.cpu_bf16)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the pairs (default: 1)")
    parser.add_argument(
        "--recompute-ref",
        action="store_true",
        help="reference log-probs in every step (training.precompute_ref_log_probs=false)",
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--no-checkpointing", action="store_true", help="GPU: no gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak if the GPU is not in the table")
    parser.add_argument("--cache", type=Path, default=REPO / "data" / "bench-cache")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    gpu = args.gpu_shape is not None
    if gpu and not torch.cuda.is_available():
        sys.exit("--gpu-shape needs a CUDA GPU; none is visible")
    pairs = args.pairs or (96 if gpu else 128)
    batch = args.batch or 16
    micro = args.micro or (4 if gpu else 16)
    prompt_tokens = args.prompt_tokens or (512 if gpu else 48)
    answer_tokens = args.answer_tokens or (512 if gpu else 48)
    rank = args.rank or (16 if gpu else 8)
    seq_len = prompt_tokens + answer_tokens
    if gpu:
        model_dir = build_llama_8b_shaped(args.cache / "llama-8b-shaped")
    elif args.model:
        from bench.harness import model_folder

        model_dir = Path(model_folder(args.model))
    else:
        from demo.tinymodel import build_tiny_model

        model_dir = build_tiny_model(args.cache / "tiny-model")

    settings = Settings(
        engine={"model": str(model_dir), "max_lora_rank": max(rank, 16)},
        training={
            "method": "dpo",
            "epochs": args.epochs,
            "precompute_ref_log_probs": not args.recompute_ref,
            "batch_size": batch,
            "micro_batch_size": micro,
            "lora_rank": rank,
            "lora_alpha": 2 * rank,
            "max_length": seq_len + 8,  # room for the chat template's role markers
            "learning_rate": 1e-4,
            "gradient_checkpointing": not args.no_checkpointing,
            "cpu_threads": args.threads,
            "cpu_bf16": args.cpu_bf16,
            "logging_steps": 1,
        },
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as scratch:
        data = write_pairs(Path(scratch) / "data", tokenizer, pairs, prompt_tokens, answer_tokens, seed=0)
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.monotonic()
        cpu_marks: dict[int, float] = {}  # step -> process CPU seconds: contention-proof on a shared CPU
        result = run_training(
            settings,
            data,
            Path(scratch) / "run",
            "bench",
            "bench",
            progress=lambda record: cpu_marks.__setitem__(int(record["step"]), time.process_time()),
        )
        wall = time.monotonic() - started

    pairs_per_step = micro * max(1, -(-batch // micro))
    steady = steady_state(result.history, pairs_per_step, args.warmup_steps)
    tokens_per_pair = 2 * seq_len  # chosen and rejected sequences each carry the prompt
    report: dict[str, Any] = {
        "mode": f"gpu:{args.gpu_shape}" if gpu else f"cpu:{args.model or 'tiny'}",
        "device": torch.cuda.get_device_name() if gpu else f"cpu ({args.threads} threads)",
        "pairs": pairs,
        "steps": result.steps,
        "batch": batch,
        "micro_batch": micro,
        "seq_len": seq_len,
        "lora_rank": rank,
        "dtype": result.dtype,
        "pairs_per_s": round(steady["pairs_per_s"], 3),
        "tokens_per_s": round(steady["pairs_per_s"] * tokens_per_pair, 1),
        "step_s": round(steady.get("step_s", 0.0), 4),
        "pairs_per_cpu_s": round(pairs_per_cpu_second(cpu_marks, pairs_per_step, args.warmup_steps), 3),
        "epochs": args.epochs,
        "precompute_ref_log_probs": not args.recompute_ref,
        "train_runtime_s": round(result.runtime_s, 2),
        "before_train_s": round(wall - result.runtime_s, 2),  # model load, and the reference pass when precomputed
        "wall_s_incl_load": round(wall, 2),
        "matmul_params": matmul_params(config),
    }
    if gpu:
        peak = gpu_peak_tflops(report["device"], args.peak_tflops)
        achieved = steady["pairs_per_s"] * tokens_per_pair * model_flops_per_token(config, seq_len)
        report["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        report["achieved_tflops"] = round(achieved / 1e12, 1)
        report["mfu"] = round(achieved / (peak * 1e12), 4) if peak else None
        report["gradient_checkpointing"] = not args.no_checkpointing
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
