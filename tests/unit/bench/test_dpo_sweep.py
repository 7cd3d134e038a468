from __future__ import annotations

from bench.dpo_sweep import DEFAULT_GRID, lora_layers, profile_settings
from demo.profiles import PROFILES
from services.core.config import TrainingSettings


def test_a_variant_is_the_profile_training_settings_plus_its_overrides() -> None:
    settings = profile_settings("smollm2", "some/model", {"beta": 0.3, "lora_rank": 32, "lora_alpha": 64})
    profile = PROFILES["smollm2"].env
    assert settings.engine.model == "some/model"
    assert settings.training.beta == 0.3
    assert settings.training.learning_rate == float(profile["FEEDLOOP_TRAINING__LEARNING_RATE"])
    assert settings.training.max_steps == int(profile["FEEDLOOP_TRAINING__MAX_STEPS"])
    assert settings.training.lora_rank == 32
    assert settings.engine.max_lora_rank >= 32  # the job refuses a rank the engine could not serve
    assert profile_settings("smollm2", "m", {}).training.beta == float(profile["FEEDLOOP_TRAINING__BETA"])


def test_every_built_in_variant_names_real_training_settings_once() -> None:
    names = [variant["name"] for variant in DEFAULT_GRID]
    assert len(names) == len(set(names))
    fields = set(TrainingSettings.model_fields)
    for variant in DEFAULT_GRID:
        assert set(variant) - {"name"} <= fields, variant
        profile_settings("smollm2", "m", {k: v for k, v in variant.items() if k != "name"})  # validates


def test_lora_layers_limits_the_trainer_s_lora_config_to_a_span_and_restores_it() -> None:
    import peft

    with lora_layers([20, 29]):
        from peft import LoraConfig  # imported at call time, as the trainer does

        assert LoraConfig(r=8).layers_to_transform == list(range(20, 30))
    assert peft.LoraConfig(r=8).layers_to_transform is None
    with lora_layers(None):
        assert peft.LoraConfig(r=8).layers_to_transform is None
