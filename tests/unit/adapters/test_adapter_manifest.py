"""Manifest validation and the atomic adapter write, on synthetic PEFT files (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.adapters.manifest import (
    CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    AdapterRejected,
    Reason,
    base_model_fingerprint,
    read_safetensors_header,
    validate_adapter,
)
from services.adapters.publish import AdapterExists, publish_adapter, read_manifest

BASE = "/models/tiny"
MODULES = ["q_proj", "v_proj"]


def write_peft_files(folder: Path, rank: int = 4, modules: list[str] = MODULES, hidden: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(2):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ones((rank, hidden), dtype=np.float32)
            tensors[f"{prefix}.lora_B.weight"] = np.zeros((hidden, rank), dtype=np.float32)
    save_file(tensors, str(folder / WEIGHTS_NAME))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": modules,
        "use_dora": False,
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    return folder


def publish(source: Path, adapters: Path, version: str = "feedloop-v1", run_id: str = "run-1", **overrides):
    fields = {
        "base_model": BASE,
        "base_model_sha256": None,
        "dataset_version": "ds-1",
        "run_id": run_id,
        "parent": None,
        "metrics": {"rewards/accuracies": 0.9},
        "versions": {"trl": "1.16.0", "peft": "0.21.2", "transformers": "5.19.0", "torch": "2.13.0"},
        **overrides,
    }
    return publish_adapter(source, adapters, version, **fields)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    publish(write_peft_files(tmp_path / "src"), tmp_path / "adapters")
    return tmp_path / "adapters" / "feedloop-v1"


def rejected_reason(path: Path, **kwargs) -> str:
    with pytest.raises(AdapterRejected) as caught:
        validate_adapter(path, kwargs.pop("base", BASE), kwargs.pop("max_rank", 16), **kwargs)
    return caught.value.reason


def test_published_adapter_has_exactly_the_contract_manifest(adapter: Path) -> None:
    manifest = json.loads((adapter / MANIFEST_NAME).read_text())
    assert set(manifest) == {
        "version", "base_model", "base_model_sha256", "rank", "alpha", "target_modules", "files",
        "dataset_version", "run_id", "parent", "metrics", "versions", "created_at",
    }  # fmt: skip
    assert (manifest["version"], manifest["rank"], manifest["alpha"]) == ("feedloop-v1", 4, 8)
    assert manifest["target_modules"] == sorted(MODULES)
    assert set(manifest["files"]) == {WEIGHTS_NAME, CONFIG_NAME}
    assert sorted(p.name for p in adapter.iterdir()) == sorted([WEIGHTS_NAME, CONFIG_NAME, MANIFEST_NAME])
    assert validate_adapter(adapter, BASE, 16, expected_version="feedloop-v1").run_id == "run-1"


def test_publish_leaves_no_staging_folders_and_is_idempotent_per_run(tmp_path: Path, adapter: Path) -> None:
    first = read_manifest(adapter)
    again = publish(write_peft_files(tmp_path / "src2", rank=2), tmp_path / "adapters")
    assert again == first  # a re-delivered task gets the adapter already written, unchanged
    with pytest.raises(AdapterExists):
        publish(tmp_path / "src2", tmp_path / "adapters", run_id="run-2")
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["feedloop-v1"]


def test_publish_replaces_an_interrupted_write(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    half = adapters / "feedloop-v2"
    half.mkdir(parents=True)
    (half / WEIGHTS_NAME).write_bytes(b"partial")  # renamed in place, crashed before manifest.json
    assert rejected_reason(half) == Reason.MISSING_MANIFEST
    publish(write_peft_files(tmp_path / "src"), adapters, "feedloop-v2")
    validate_adapter(half, BASE, 16)
    assert [p.name for p in adapters.iterdir()] == ["feedloop-v2"]


def test_failed_copy_leaves_nothing_behind(tmp_path: Path) -> None:
    source = write_peft_files(tmp_path / "src")
    (source / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError):
        publish(source, tmp_path / "adapters")
    assert list((tmp_path / "adapters").iterdir()) == []


def test_manifest_checks_each_give_their_reason(adapter: Path) -> None:
    assert rejected_reason(adapter, base="/models/other") == Reason.WRONG_BASE_MODEL
    assert rejected_reason(adapter, max_rank=2) == Reason.RANK_TOO_HIGH
    assert rejected_reason(adapter, supported_modules=["q_proj"]) == Reason.UNSUPPORTED_TARGET_MODULES
    assert rejected_reason(adapter, expected_version="feedloop-v9") == Reason.INVALID_MANIFEST
    assert rejected_reason(adapter.parent / "feedloop-missing") == Reason.MISSING_MANIFEST


def test_base_fingerprints_decide_when_both_sides_have_one(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 16}')
    save_file({"w": np.arange(64, dtype=np.float32)}, str(model / "model.safetensors"))
    fingerprint = base_model_fingerprint(str(model))
    assert fingerprint is not None and base_model_fingerprint(str(tmp_path / "nothing")) is None
    publish(write_peft_files(tmp_path / "src"), tmp_path / "adapters", base_model_sha256=fingerprint)
    path = tmp_path / "adapters" / "feedloop-v1"
    # The same weights mounted elsewhere are the same base; other weights at the same path are not.
    validate_adapter(path, "/mnt/elsewhere/tiny", 16, served_base_sha256=fingerprint)
    assert rejected_reason(path, served_base_sha256="f" * 64) == Reason.WRONG_BASE_MODEL
    save_file({"w": np.arange(64, dtype=np.float32) + 1}, str(model / "model.safetensors"))
    assert base_model_fingerprint(str(model)) != fingerprint


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", Reason.INVALID_WEIGHTS),
        ("flip_data_byte", Reason.CHECKSUM_MISMATCH),
        ("append_bytes", Reason.INVALID_WEIGHTS),
        ("garble_manifest", Reason.INVALID_MANIFEST),
        ("drop_manifest_field", Reason.INVALID_MANIFEST),
        ("config_rank", Reason.CONFIG_MISMATCH),
        ("config_modules", Reason.CONFIG_MISMATCH),
        ("dora", Reason.UNSUPPORTED_ADAPTER),
        ("delete_config", Reason.MISSING_FILE),
    ],
)
def test_damaged_adapter_is_rejected(adapter: Path, damage: str, reason: str) -> None:
    weights, config_path, manifest_path = (
        adapter / WEIGHTS_NAME,
        adapter / CONFIG_NAME,
        adapter / MANIFEST_NAME,
    )
    config = json.loads(config_path.read_text())
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 10)
    elif damage == "flip_data_byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
    elif damage == "append_bytes":
        weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    elif damage == "garble_manifest":
        manifest_path.write_text("{not json")
    elif damage == "drop_manifest_field":
        manifest = json.loads(manifest_path.read_text())
        del manifest["files"]
        manifest_path.write_text(json.dumps(manifest))
    elif damage == "config_rank":
        config_path.write_text(json.dumps({**config, "r": 8}))
    elif damage == "config_modules":
        config_path.write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    elif damage == "dora":
        config_path.write_text(json.dumps({**config, "use_dora": True}))
    elif damage == "delete_config":
        config_path.unlink()
    assert rejected_reason(adapter) == reason


def test_weights_must_match_the_manifest_shape(tmp_path: Path) -> None:
    """A manifest+config that lie consistently about the rank are caught by the tensor shapes."""
    source = write_peft_files(tmp_path / "src", rank=32)
    config = json.loads((source / CONFIG_NAME).read_text())
    (source / CONFIG_NAME).write_text(json.dumps({**config, "r": 4}))
    publish(source, tmp_path / "adapters")
    assert rejected_reason(tmp_path / "adapters" / "feedloop-v1") == Reason.RANK_TOO_HIGH

    source = write_peft_files(tmp_path / "src2", modules=["q_proj", "v_proj", "k_proj"])
    config = json.loads((source / CONFIG_NAME).read_text())
    (source / CONFIG_NAME).write_text(json.dumps({**config, "target_modules": ["q_proj", "v_proj"]}))
    publish(source, tmp_path / "adapters", "feedloop-v2")
    assert rejected_reason(tmp_path / "adapters" / "feedloop-v2") == Reason.CONFIG_MISMATCH


def test_header_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": np.zeros((3, 5), dtype=np.float16), "b": np.ones(7, dtype=np.int64)}, str(path))
    header = read_safetensors_header(path)
    assert header["a"]["shape"] == [3, 5] and header["a"]["dtype"] == "F16"
    assert header["b"]["dtype"] == "I64"
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(ValueError, match="shorter"):
        read_safetensors_header(path)
