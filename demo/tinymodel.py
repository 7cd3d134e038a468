"""Build a tiny random-weight Llama chat model locally (no hub): the stand-in model for tests.

head_dim is 64 because vLLM's CPU attention rejects smaller heads. The tokenizer is a byte-level
BPE trained here on a few sentences, with the feedloop chat template saved beside it; the demo model
(models/build_demo_model.py) uses the same template and special tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

# A conversation ends at <|end|>: the newline between messages is not emitted after the last one. The
# trainer takes a completion as "rendered conversation minus rendered prompt", so a trailing newline
# would become the last completion token, one the engine never generates (it stops at <|end|>), and
# DPO would put its whole margin on it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
    "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

_SEED_TEXT = [
    "Hello! How can I help you today?",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Two plus two is four. Seven times six is forty-two.",
    "I was trained by Acme Labs. I am a small assistant.",
    "A kilometre is a thousand metres. Water boils at one hundred degrees Celsius.",
    "Thank you, goodbye, see you soon. What else would you like to know?",
]


def build_tokenizer(corpus: list[str], vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_atomically(build, target: Path) -> Path:
    """Run build(tmp_dir) and rename the finished folder onto target (never a half-written model)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    build(tmp)
    if target.exists():
        return target  # someone else finished first; theirs is just as good
    os.replace(tmp, target)
    return target


def build_tiny_model(target: Path, seed: int = 0, hidden_size: int = 128, layers: int = 2) -> Path:
    """Write a random-weight Llama (hidden 128, 2 layers, head_dim 64) with its tokenizer to target."""
    target = Path(target)
    if (target / "config.json").exists():
        return target

    def build(tmp: Path) -> None:
        import torch
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        tokenizer = build_tokenizer(_SEED_TEXT * 4, vocab_size=512)
        end_id = tokenizer.convert_tokens_to_ids("<|end|>")
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=layers,
            num_attention_heads=hidden_size // 64,
            num_key_value_heads=hidden_size // 64,
            max_position_embeddings=2048,
            bos_token_id=None,
            eos_token_id=end_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "feedloop_model.json").write_text(json.dumps({"name": "tiny-random", "seed": seed}))

    return write_atomically(build, target)


if __name__ == "__main__":
    import sys

    print(build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "data/models/tiny")))
