"""Build a good adapter for the tiny model and a corpus of bad ones made from it.

Shared by the manifest tests and the hot-swap tests (every bad adapter must be rejected before an
engine loads it). Each bad case differs from the good adapter in one way and names the
AdapterRejected reason it must produce.

    good = build_good_adapter(tiny_model_dir, adapters_dir)
    corpus = build_bad_adapter_corpus(tiny_model_dir, adapters_dir, max_lora_rank=16)
    for case in corpus: validate_adapter(case.path, ...) raises AdapterRejected(case.reason, ...)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.adapters.manifest import (
    CONFIG_NAME,
    LLAMA_LORA_MODULES,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    Reason,
    base_model_fingerprint,
    base_model_id,
)
from services.adapters.publish import publish_adapter


@dataclass(frozen=True)
class BadAdapter:
    name: str
    path: Path
    reason: str  # the Reason code validate_adapter must raise


def save_lora(
    model_dir: Path,
    out_dir: Path,
    rank: int = 8,
    alpha: int = 16,
    target_modules: tuple[str, ...] = LLAMA_LORA_MODULES,
    seed: int = 0,
    std: float = 0.05,
    fill: float | None = None,
) -> Path:
    """Save a PEFT LoRA adapter with random, non-zero weights (so it visibly changes the output). On the tiny
        model, std 1.0 keeps greedy answers varied; ``fill`` sets every LoRA weight to one value instead: with 0.5 every
    answer repeats one token (a degenerate adapter that still passes every manifest check)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                if fill is None:
                    param.normal_(0, std)
                else:
                    param.fill_(fill)
    model.save_pretrained(out_dir)
    return out_dir


def publish_lora(model_dir: Path, adapters_dir: Path, version: str, run_id: str | None = None, **lora_kwargs) -> Path:
    """save_lora + publish_adapter: a complete adapter folder with a manifest for model_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        source = save_lora(model_dir, Path(scratch) / "lora", **lora_kwargs)
        publish_adapter(
            source,
            adapters_dir,
            version,
            base_model=base_model_id(str(model_dir)),
            base_model_sha256=base_model_fingerprint(str(model_dir)),
            dataset_version="test-dataset",
            run_id=run_id or f"run-{version}",
            parent=None,
            metrics={"rewards/accuracies": 1.0},
            versions={"trl": None, "peft": None, "transformers": None, "torch": None},
        )
    return adapters_dir / version


def build_good_adapter(model_dir: Path, adapters_dir: Path, version: str = "feedloop-v1") -> Path:
    return publish_lora(model_dir, adapters_dir, version)


def _copy(good: Path, adapters_dir: Path, name: str) -> Path:
    """Copy the good adapter under a new version name, its manifest renamed to match."""
    target = adapters_dir / name
    shutil.copytree(good, target)
    _edit_manifest(target, version=name)
    return target


def _edit_manifest(adapter: Path, **changes) -> None:
    path = adapter / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest, indent=2))


def build_bad_adapter_corpus(
    model_dir: Path, adapters_dir: Path, max_lora_rank: int = 16, prefix: str = "feedloop-bad"
) -> list[BadAdapter]:
    """Write one folder per failure under adapters_dir (names ``{prefix}-{case}``)."""
    adapters_dir.mkdir(parents=True, exist_ok=True)
    good = build_good_adapter(model_dir, adapters_dir, f"{prefix}-source")
    corpus: list[BadAdapter] = []

    def add(case: str, path: Path, reason: str) -> None:
        corpus.append(BadAdapter(case, path, reason))

    wrong_base = _copy(good, adapters_dir, f"{prefix}-wrong-base")
    _edit_manifest(wrong_base, base_model="/models/some-other-llama", base_model_sha256="0" * 64)
    add("wrong_base_model", wrong_base, Reason.WRONG_BASE_MODEL)

    # Real weights of a consistent rank-2x adapter: only the engine's limit is wrong.
    too_big = publish_lora(model_dir, adapters_dir, f"{prefix}-rank", rank=2 * max_lora_rank, alpha=32)
    add("rank_above_max", too_big, Reason.RANK_TOO_HIGH)

    lm_head = publish_lora(model_dir, adapters_dir, f"{prefix}-modules", target_modules=("q_proj", "lm_head"))
    add("unsupported_target_modules", lm_head, Reason.UNSUPPORTED_TARGET_MODULES)

    truncated = _copy(good, adapters_dir, f"{prefix}-truncated")
    weights = truncated / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    add("truncated_weights", truncated, Reason.INVALID_WEIGHTS)

    tampered = _copy(good, adapters_dir, f"{prefix}-sha256")
    data = bytearray((tampered / WEIGHTS_NAME).read_bytes())
    data[-5] ^= 0xFF  # a byte of tensor data: the header stays valid, only the hash can tell
    (tampered / WEIGHTS_NAME).write_bytes(bytes(data))
    add("sha256_mismatch", tampered, Reason.CHECKSUM_MISMATCH)

    no_manifest = _copy(good, adapters_dir, f"{prefix}-no-manifest")
    (no_manifest / MANIFEST_NAME).unlink()
    add("missing_manifest", no_manifest, Reason.MISSING_MANIFEST)

    garbled = _copy(good, adapters_dir, f"{prefix}-garbled-manifest")
    (garbled / MANIFEST_NAME).write_text('{"version": "feedloop-bad-garbled-manifest", "rank": ')
    add("invalid_manifest", garbled, Reason.INVALID_MANIFEST)

    config_lies = _copy(good, adapters_dir, f"{prefix}-config")
    config = json.loads((config_lies / CONFIG_NAME).read_text())
    config["r"] = config["r"] // 2
    (config_lies / CONFIG_NAME).write_text(json.dumps(config))
    add("config_disagrees", config_lies, Reason.CONFIG_MISMATCH)

    no_weights = _copy(good, adapters_dir, f"{prefix}-no-weights")
    (no_weights / WEIGHTS_NAME).unlink()
    add("missing_weights", no_weights, Reason.MISSING_FILE)

    shutil.rmtree(good)
    return corpus
