"""Adapters really trained (TRL DPO + PEFT on CPU) on the hand-made preference data of tests/support/preference_data.py.

``training_settings`` is the recipe the tiny model learns in seconds; ``publish_result`` writes a run's adapter
into an adapters folder the way the training job does (atomic, with its manifest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.adapters.publish import publish_adapter
from services.core.config import Settings
from tests.support.preference_data import SMOKE_PROMPTS, write_dataset
from workers.training.trainer import TrainingResult, run_training

MAX_RANK = 16


def training_settings(model_dir: Path, **training: Any) -> Settings:
    return Settings(
        engine={"model": str(model_dir), "max_lora_rank": MAX_RANK},
        training={
            "epochs": 5,
            "batch_size": 8,
            "micro_batch_size": 8,
            "learning_rate": 1e-2,
            "sft_weight": 1.0,
            "max_length": 128,
            "lora_rank": 8,
            "lora_alpha": 16,
            "cpu_threads": 1,
            **training,
        },
        # The random-weight base already scores ~0.6 on this split (its sentence log-probs depend weakly
        # on the prompt): the bar sits above that, the trained adapter reaches 1.0.
        gate={"smoke_prompts": SMOKE_PROMPTS, "min_accuracy": 0.75},
    )


def publish_result(result: TrainingResult, adapters_dir: Path, version: str) -> Path:
    publish_adapter(
        result.adapter_dir,
        adapters_dir,
        version,
        base_model=result.base_model,
        base_model_sha256=result.base_model_sha256,
        dataset_version=result.dataset_version,
        run_id=result.run_id,
        parent=result.parent,
        metrics=result.manifest_metrics(),
        versions=result.versions,
    )
    return adapters_dir / version


def train_on_preferences(model_dir: Path, workdir: Path, name: str, flip: bool = False) -> TrainingResult:
    """A fresh DPO adapter trained on the facts (``flip``: on the opposite preference)."""
    dataset = write_dataset(workdir / "datasets" / name, flip=flip)
    return run_training(training_settings(model_dir), dataset, workdir / "runs" / name, f"run-{name}", name)
