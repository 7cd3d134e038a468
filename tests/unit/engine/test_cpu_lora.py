"""The grouped CPU LoRA ops give what vLLM's per-token ops give, for every form vLLM calls them in (pure torch)."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops

from services.engine.cpu_lora import (
    PATCHED,
    grouped_lora_product,
    make_bgmv_expand,
    make_bgmv_expand_slice,
    make_bgmv_shrink,
    use_grouped_lora_ops,
)

TOKENS, HIDDEN, RANK, SLOTS = 13, 24, 8, 4
# one adapter for the whole batch (the usual case), a mix, and -1 (vLLM's "no adapter": the last slot in torch)
INDICES = [[2] * TOKENS, [0, 1, 1, 3, 0, 2, 2, 2, 1, 0, 3, 3, 0], [-1] * 5 + [1] * 8]


def _weights(out: int, inner: int, four_d: bool) -> torch.Tensor:
    shape = (SLOTS, 1, out, inner) if four_d else (SLOTS, out, inner)
    return torch.randn(shape, generator=torch.Generator().manual_seed(out * inner))


def _original(name: str):
    # the functions as vLLM ships them, even after use_grouped_lora_ops() replaced the module's names
    return getattr(lora_ops, PATCHED, {}).get(name) or getattr(lora_ops, name)


@pytest.mark.parametrize("indices", INDICES)
@pytest.mark.parametrize("four_d", [True, False])
def test_shrink_matches_vllm(indices, four_d) -> None:
    x = torch.randn(TOKENS, HIDDEN)
    weights = _weights(RANK, HIDDEN, four_d)
    index = torch.tensor(indices)
    expected, got = torch.zeros(TOKENS, RANK + 2), torch.zeros(TOKENS, RANK + 2)
    _vllm_shrink(x, weights, expected, index, 0.5)
    make_bgmv_shrink(_vllm_shrink)(x, weights, got, index, 0.5)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("indices", INDICES)
@pytest.mark.parametrize("add_inputs", [True, False])
def test_expand_and_expand_slice_match_vllm(indices, add_inputs) -> None:
    x = torch.randn(TOKENS, RANK)
    weights = _weights(HIDDEN, RANK, True)
    index = torch.tensor(indices)
    start = torch.randn(TOKENS, HIDDEN + 6)
    expected, got = start.clone(), start.clone()
    _vllm_expand(x, weights, expected, index, add_inputs)
    make_bgmv_expand(_vllm_expand)(x, weights, got, index, add_inputs)
    torch.testing.assert_close(got, expected)

    expected, got = start.clone(), start.clone()
    _vllm_expand_slice(x, weights, expected, index, 3, HIDDEN, add_inputs)
    make_bgmv_expand_slice(_vllm_expand_slice)(x, weights, got, index, 3, HIDDEN, add_inputs)
    torch.testing.assert_close(got, expected)


def test_a_form_it_does_not_expect_goes_to_vllm() -> None:
    calls = []
    shrink = make_bgmv_shrink(lambda *args: calls.append(args))
    x, weights = torch.randn(1, HIDDEN), _weights(RANK, HIDDEN, False)
    shrink(x, weights, torch.zeros(3, RANK), torch.tensor([0, 1, 2]), 1.0)  # one input row, three indices
    assert len(calls) == 1
    assert grouped_lora_product(x, weights, torch.tensor([0, 1, 2]), torch.float32) is None


def test_the_patch_replaces_the_names_vllm_calls_once() -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    use_grouped_lora_ops()
    first = lora_ops.bgmv_shrink
    use_grouped_lora_ops()
    assert lora_ops.bgmv_shrink is first is punica_cpu.bgmv_shrink
    assert first.__module__ == "services.engine.cpu_lora"
    assert punica_cpu.bgmv_expand is lora_ops.bgmv_expand and punica_cpu.bgmv_expand_slice is lora_ops.bgmv_expand_slice


_vllm_shrink = _original("bgmv_shrink")
_vllm_expand = _original("bgmv_expand")
_vllm_expand_slice = _original("bgmv_expand_slice")
