"""The chat benchmark's round order and report (bench/chat_vs_vllm.py): pure logic."""

from __future__ import annotations

from bench.chat_vs_vllm import BASE, OURS, VLLM, order, table


def test_rounds_alternate_so_each_target_goes_first_in_half_of_the_pairs() -> None:
    plan = order(4, OURS, VLLM)
    assert plan == [OURS, VLLM, VLLM, OURS, OURS, VLLM, VLLM, OURS]
    pairs = [tuple(plan[i : i + 2]) for i in range(0, len(plan), 2)]
    assert sum(p[0] == OURS for p in pairs) == sum(p[0] == VLLM for p in pairs)


def summary(rps: float) -> dict:
    return {
        "requests": 10, "errors": 0, "requests_per_s": rps, "output_tokens_per_s": rps * 100, "ttft_p50_ms": 100.0,
        "ttft_p99_ms": 200.0, "api_cpu_ms_per_request": 5.0,
    }  # fmt: skip


def test_the_adapter_round_is_reported_as_the_adapters_cost_not_as_vllm() -> None:
    vs_vllm = table({"results": {OURS: summary(10), VLLM: summary(8)}, "ratio_ours_over_vllm": ratios(1.25)})
    assert "vLLM OpenAI server" in vs_vllm and "ratio ours/vLLM" in vs_vllm
    cost = table({"results": {OURS: summary(6), BASE: summary(8)}, "ratio_adapter_over_base": ratios(0.75)})
    assert "feedloop, LoRA adapter" in cost and "feedloop, base model" in cost and "ratio adapter/base" in cost
    assert "vLLM" not in cost and "0.750" in cost


def ratios(value: float) -> dict:
    keys = ("requests_per_s", "output_tokens_per_s", "ttft_p50", "ttft_p99", "api_cpu_per_request")
    return dict.fromkeys(keys, value)
