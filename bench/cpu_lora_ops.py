"""vLLM's CPU LoRA ops against feedloop's grouped ones (services/engine/cpu_lora.py), side by side in one process.

    .venv/bin/python bench/cpu_lora_ops.py [--hidden 576] [--out-dim 1536] [--rank 16] [--threads 2]

One shrink (x @ A.T) and one expand (+= y @ B.T) per call, as vLLM applies LoRA to one linear layer, for batches of
tokens that all use one adapter (the usual case) and tokens spread over four. Shapes default to SmolLM2-135M's
MLP (hidden 576, intermediate 1536) at the engine's max_lora_rank 16; a forward pass makes 7 such calls per layer.
Rounds alternate between the two implementations. Writes bench/results/cpu_lora_ops.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_lora_ops.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--out-dim", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=4, help="adapter slots (engine.max_loras)")
    parser.add_argument("--tokens", default="16,128,512,2048", help="tokens per call (a decode step: one per sequence)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch
    from vllm.lora.ops.torch_ops import lora_ops

    from services.engine.cpu_lora import PATCHED, make_bgmv_expand, make_bgmv_shrink

    torch.set_num_threads(args.threads)
    originals = getattr(lora_ops, PATCHED, None) or {
        "bgmv_shrink": lora_ops.bgmv_shrink,
        "bgmv_expand": lora_ops.bgmv_expand,
    }
    kinds = {
        "vllm": (originals["bgmv_shrink"], originals["bgmv_expand"]),
        "grouped": (make_bgmv_shrink(originals["bgmv_shrink"]), make_bgmv_expand(originals["bgmv_expand"])),
    }
    a = torch.randn(args.slots, 1, args.rank, args.hidden)
    b = torch.randn(args.slots, 1, args.out_dim, args.rank)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, args.hidden)
        for spread, indices in (("one adapter", torch.full((tokens,), 1)), ("four adapters", torch.arange(tokens) % 4)):
            times: dict[str, list[float]] = {name: [] for name in kinds}
            reps = max(3, 4096 // tokens)
            for round_ in range(args.rounds):
                for name in sorted(kinds, reverse=round_ % 2 == 1):  # A B, B A, ...
                    shrink, expand = kinds[name]
                    y, z = torch.zeros(tokens, args.rank), torch.zeros(tokens, args.out_dim)
                    started = time.perf_counter()
                    for _ in range(reps):
                        shrink(x, a, y, indices, 1.0)
                        expand(y, b, z, indices, True)
                    times[name].append((time.perf_counter() - started) / reps * 1000)
            vllm_ms, grouped_ms = statistics.median(times["vllm"]), statistics.median(times["grouped"])
            rows.append({"tokens": tokens, "adapters": spread, "vllm_ms": round(vllm_ms, 3),
                         "grouped_ms": round(grouped_ms, 3), "speedup": round(vllm_ms / grouped_ms, 1)})  # fmt: skip
    print("| tokens | adapters in the batch | vLLM's op (ms) | grouped (ms) | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['tokens']} | {r['adapters']} | {r['vllm_ms']} | {r['grouped_ms']} | {r['speedup']}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
