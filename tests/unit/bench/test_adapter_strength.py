from __future__ import annotations

import pytest

from bench.adapter_strength import strength_setter

torch = pytest.importorskip("torch")


def tiny_lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    base = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def test_strength_scales_the_lora_update_between_the_base_and_the_trained_adapter() -> None:
    model = tiny_lora_model()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        trained = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
        set_strength = strength_setter(model)
        set_strength(0.0)
        assert torch.allclose(model(ids).logits, base, atol=1e-6)
        set_strength(0.5)
        half = model(ids).logits
        set_strength(1.0)
        assert torch.allclose(model(ids).logits, trained, atol=1e-6)
    assert not torch.allclose(half, base, atol=1e-4) and not torch.allclose(half, trained, atol=1e-4)
