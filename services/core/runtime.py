"""Small runtime helpers shared by the training and evaluation stages (heavy imports stay inside)."""

from __future__ import annotations

from pathlib import Path

from services.core.config import Settings


def quiet_progress_bars() -> None:
    """Worker logs get one line per logging step, not tqdm bars from datasets/transformers."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def use_cpu_threads(settings: Settings, on_gpu: bool) -> None:
    import torch

    if not on_gpu and settings.training.cpu_threads > 0:
        torch.set_num_threads(settings.training.cpu_threads)


# CPU feature flags (as /proc/cpuinfo names them) of native bf16 matrix instructions: without them torch computes bf16
# by converting to float32 and back, slower than float32 itself.
BF16_MATMUL_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":  # x86; ARM's "Features" name no flag of BF16_MATMUL_FLAGS
            return frozenset(value.split())
    return frozenset()


def train_cpu_in_bf16(setting: bool | str, flags: frozenset[str] | None = None) -> bool:
    """training.cpu_bf16 resolved: "auto" is on where the CPU has native bf16 matrix instructions."""
    if setting == "auto":
        return bool(BF16_MATMUL_FLAGS & (cpu_flags() if flags is None else flags))
    return bool(setting)


def served_tokenizer(settings: Settings):  # -> transformers.PreTrainedTokenizerBase
    """The base model's tokenizer with the chat template the engine renders with (``engine.chat_template``
    when set, e.g. one that renders tools), so training and the gate see the prompts serving sees.
    Raises OSError when that template cannot be read."""
    return load_tokenizer(settings.model_path(), settings.engine.chat_template)


def load_tokenizer(model_path: str, chat_template: str = ""):  # -> transformers.PreTrainedTokenizerBase
    """A model folder's tokenizer, its chat template replaced by the file `chat_template` when given.
    Raises OSError when that template cannot be read."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template:
        try:
            tokenizer.chat_template = Path(chat_template).read_text()
        except OSError as error:
            raise OSError(f"engine.chat_template {chat_template}: {error}") from error
    return tokenizer
