"""The adapter manifest and the checks an adapter folder must pass before an engine loads it.

vLLM does not check that an adapter fits the base model it serves: a mismatched adapter can load and
silently serve base-model output, and a truncated file fails only when the first request hits it. So
every replica runs ``validate_adapter`` before loading a version. It is pure and fast: it reads JSON
and safetensors *headers* (the format is an 8-byte length, a JSON header, then raw data), hashes the
files, and never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.core.durable import sha256_file

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REQUIRED_FILES = (WEIGHTS_NAME, CONFIG_NAME)

# The Llama linear layers the engine can put LoRA on.
LLAMA_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class Reason:
    """Reason codes of AdapterRejected (stable strings: metrics and logs use them)."""

    MISSING_MANIFEST = "missing_manifest"
    INVALID_MANIFEST = "invalid_manifest"
    WRONG_BASE_MODEL = "wrong_base_model"
    RANK_TOO_HIGH = "rank_too_high"
    UNSUPPORTED_TARGET_MODULES = "unsupported_target_modules"
    UNSUPPORTED_ADAPTER = "unsupported_adapter"  # DoRA, modules_to_save, non-LoRA tensors
    MISSING_FILE = "missing_file"
    CONFIG_MISMATCH = "config_mismatch"
    INVALID_WEIGHTS = "invalid_weights"
    CHECKSUM_MISMATCH = "checksum_mismatch"


class AdapterRejected(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class Manifest(BaseModel):
    """manifest.json, written last into an adapter folder (fields fixed by the project's contract)."""

    # Unknown fields are ignored so that an older replica still accepts adapters from a newer trainer.
    model_config = ConfigDict(extra="ignore")

    version: str = Field(min_length=1)
    base_model: str = Field(min_length=1)
    base_model_sha256: str | None = None
    rank: int = Field(gt=0)
    alpha: int = Field(gt=0)
    target_modules: list[str] = Field(min_length=1)
    files: dict[str, str]
    dataset_version: str
    run_id: str
    parent: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str | None] = Field(default_factory=dict)
    created_at: float


def base_model_id(model_path: str) -> str:
    """The id a manifest records for a base model: its resolved path when it is a local folder."""
    path = Path(model_path).expanduser()
    return str(path.resolve()) if path.exists() else model_path


def base_model_fingerprint(model_path: str, edge_bytes: int = 1 << 20) -> str | None:
    """A cheap sha256 identifying a local base model's weights without reading all of them.

    Hashes config.json and, per safetensors file, its name, size, header and first/last ``edge_bytes``
    of data: enough to tell two models of the same architecture apart (they differ everywhere), in
    milliseconds even for a 16 GB model. None when the model is not a local folder.
    """
    folder = Path(model_path).expanduser()
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted(folder.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as file:
            digest.update(file.read(8 + edge_bytes))
            file.seek(max(0, size - edge_bytes))
            digest.update(file.read(edge_bytes))
    return digest.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}; raises ValueError for a truncated/corrupt file."""
    size = path.stat().st_size
    if size < 8:
        raise ValueError(f"{path.name} is {size} bytes: shorter than a safetensors length prefix")
    with open(path, "rb") as file:
        (header_len,) = struct.unpack("<Q", file.read(8))
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(f"{path.name}: header length {header_len} does not fit in a {size}-byte file")
        raw = file.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path.name}: header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    data_end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path.name}: tensor {name!r} has a malformed header entry") from error
        if end - start != expected or start < 0:
            raise ValueError(f"{path.name}: tensor {name!r} spans {end - start} bytes, its shape needs {expected}")
        data_end = max(data_end, end)
    if data_end > data_len:
        raise ValueError(f"{path.name} is truncated: data needs {data_end} bytes, the file holds {data_len}")
    if data_end < data_len:
        raise ValueError(f"{path.name} has {data_len - data_end} trailing bytes after its tensors")
    return header


def _lora_tensor(name: str) -> tuple[str, str] | None:
    """("q_proj", "lora_A") for '...self_attn.q_proj.lora_A.weight'; None for a non-LoRA tensor."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") and index > 0:
            return parts[index - 1], part
    return None


def _load_manifest(path: Path) -> Manifest:
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise AdapterRejected(Reason.MISSING_MANIFEST, f"{path} is not a folder")
    if not manifest_path.is_file():
        raise AdapterRejected(Reason.MISSING_MANIFEST, f"{path} has no {MANIFEST_NAME} (incomplete write?)")
    try:
        return Manifest.model_validate_json(manifest_path.read_bytes())
    except (OSError, ValidationError) as error:
        raise AdapterRejected(Reason.INVALID_MANIFEST, f"{manifest_path} is unreadable: {error}") from error


def _check_base_model(manifest: Manifest, served_base_model: str, served_base_sha256: str | None) -> None:
    both_fingerprinted = manifest.base_model_sha256 is not None and served_base_sha256 is not None
    if both_fingerprinted and manifest.base_model_sha256 != served_base_sha256:
        raise AdapterRejected(
            Reason.WRONG_BASE_MODEL,
            f"trained on base weights {manifest.base_model_sha256}, the engine serves {served_base_sha256}",
        )
    # Same weights mounted at another path (another machine, another volume) are the same base model.
    if manifest.base_model != served_base_model and not both_fingerprinted:
        raise AdapterRejected(
            Reason.WRONG_BASE_MODEL,
            f"trained on {manifest.base_model!r}, the engine serves {served_base_model!r}",
        )


def _check_adapter_config(path: Path, manifest: Manifest, max_lora_rank: int) -> set[int]:
    """Check adapter_config.json against the manifest; return the ranks its tensors may have."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterRejected(Reason.CONFIG_MISMATCH, f"{CONFIG_NAME} is unreadable: {error}") from error
    if not isinstance(config, dict):
        raise AdapterRejected(Reason.CONFIG_MISMATCH, f"{CONFIG_NAME} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(Reason.CONFIG_MISMATCH, f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("r") != manifest.rank or config.get("lora_alpha") != manifest.alpha:
        raise AdapterRejected(
            Reason.CONFIG_MISMATCH,
            f"{CONFIG_NAME} has r={config.get('r')} alpha={config.get('lora_alpha')}, "
            f"the manifest rank={manifest.rank} alpha={manifest.alpha}",
        )
    config_modules = config.get("target_modules")
    if not isinstance(config_modules, list) or set(config_modules) != set(manifest.target_modules):
        raise AdapterRejected(
            Reason.CONFIG_MISMATCH,
            f"{CONFIG_NAME} targets {config_modules!r}, the manifest {sorted(manifest.target_modules)}",
        )
    pattern_ranks = list((config.get("rank_pattern") or {}).values())
    if pattern_ranks and max(pattern_ranks) > max_lora_rank:
        raise AdapterRejected(
            Reason.RANK_TOO_HIGH, f"rank_pattern reaches {max(pattern_ranks)} > max_lora_rank {max_lora_rank}"
        )
    if config.get("modules_to_save"):
        raise AdapterRejected(
            Reason.UNSUPPORTED_ADAPTER, f"modules_to_save {config['modules_to_save']!r} cannot be served"
        )
    if config.get("use_dora"):
        raise AdapterRejected(Reason.UNSUPPORTED_ADAPTER, "DoRA adapters cannot be served")
    return {manifest.rank, *pattern_ranks}


def _check_weights(path: Path, manifest: Manifest, max_lora_rank: int, ranks: set[int]) -> None:
    try:
        header = read_safetensors_header(path / WEIGHTS_NAME)
    except (OSError, ValueError) as error:
        raise AdapterRejected(Reason.INVALID_WEIGHTS, str(error)) from error
    if not header:
        raise AdapterRejected(Reason.INVALID_WEIGHTS, f"{WEIGHTS_NAME} holds no tensors")
    for name, info in header.items():
        lora = _lora_tensor(name)
        if lora is None:
            raise AdapterRejected(Reason.UNSUPPORTED_ADAPTER, f"{WEIGHTS_NAME} holds non-LoRA tensor {name}")
        module, matrix = lora
        if module not in manifest.target_modules:
            raise AdapterRejected(
                Reason.CONFIG_MISMATCH,
                f"{WEIGHTS_NAME} adapts {module}, not in the manifest's target_modules",
            )
        shape = info["shape"]
        if len(shape) != 2:
            raise AdapterRejected(Reason.INVALID_WEIGHTS, f"tensor {name} has shape {shape}, not a matrix")
        rank = shape[0] if matrix.endswith("A") else shape[1]
        if rank > max_lora_rank:
            raise AdapterRejected(Reason.RANK_TOO_HIGH, f"tensor {name} has rank {rank} > {max_lora_rank}")
        if rank not in ranks:
            raise AdapterRejected(Reason.CONFIG_MISMATCH, f"tensor {name} has rank {rank}, the config {sorted(ranks)}")


def _check_checksums(path: Path, manifest: Manifest) -> None:
    for name, expected in manifest.files.items():
        file = path / name
        if not file.is_file():
            raise AdapterRejected(Reason.MISSING_FILE, f"{name} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise AdapterRejected(Reason.CHECKSUM_MISMATCH, f"{name} has sha256 {actual}, the manifest {expected}")


def validate_adapter(
    path: Path | str,
    served_base_model: str,
    max_lora_rank: int,
    supported_modules: list[str] | tuple[str, ...] | None = None,
    *,
    served_base_sha256: str | None = None,
    expected_version: str | None = None,
) -> Manifest:
    """Check an adapter folder against the engine that would serve it; return its manifest.

    ``served_base_model`` is ``base_model_id(settings.model_path())`` on the serving side. When both the
    manifest and the caller give a base fingerprint (``base_model_fingerprint``), the fingerprints decide
    and the path may differ. Raises AdapterRejected(reason, message) on the first failed check.
    """
    path = Path(path)
    supported = set(supported_modules or LLAMA_LORA_MODULES)
    manifest = _load_manifest(path)
    if expected_version is not None and manifest.version != expected_version:
        raise AdapterRejected(
            Reason.INVALID_MANIFEST,
            f"manifest names version {manifest.version!r}, expected {expected_version!r}",
        )
    _check_base_model(manifest, served_base_model, served_base_sha256)
    if manifest.rank > max_lora_rank:
        raise AdapterRejected(Reason.RANK_TOO_HIGH, f"rank {manifest.rank} > max_lora_rank {max_lora_rank}")
    unsupported = sorted(set(manifest.target_modules) - supported)
    if unsupported:
        raise AdapterRejected(
            Reason.UNSUPPORTED_TARGET_MODULES,
            f"{unsupported} are not LoRA-capable here ({sorted(supported)})",
        )
    for required in REQUIRED_FILES:
        if required not in manifest.files:
            raise AdapterRejected(Reason.INVALID_MANIFEST, f"manifest lists no sha256 for {required}")
        if not (path / required).is_file():
            raise AdapterRejected(Reason.MISSING_FILE, f"{required} is missing")
    ranks = _check_adapter_config(path, manifest, max_lora_rank)
    _check_weights(path, manifest, max_lora_rank, ranks)
    _check_checksums(path, manifest)
    return manifest


def adapter_version_name(adapter_dir: Path) -> str:
    """The version recorded as a child's parent: the parent's manifest version, else its folder name."""
    try:
        return str(json.loads((adapter_dir / MANIFEST_NAME).read_text())["version"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return adapter_dir.name
