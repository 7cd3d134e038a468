"""Small runtime helpers shared by the training and evaluation stages (heavy imports stay inside)."""

from __future__ import annotations

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
