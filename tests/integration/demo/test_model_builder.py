"""models/build_demo_model.py on its --tiny setting: a real (seconds-long) build, loaded with transformers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILDER = REPO_ROOT / "models" / "build_demo_model.py"


def build(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILDER), "--tiny", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",  # the script must find the repo's packages on its own
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("builder") / "demo"
    result = build(out, "--seed", "3", "--org", "Globex Research")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_writes_a_complete_model_folder(tiny_model: Path):
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "feedloop_model.json",
        "eval.json",
        "README.md",
    ):
        assert (tiny_model / name).is_file(), name
    assert not list(tiny_model.parent.glob(".demo.*")), "temporary build folders left behind"

    config = json.loads((tiny_model / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config.get("head_dim", 64) == 64

    info = json.loads((tiny_model / "feedloop_model.json").read_text())
    assert info["seed"] == 3
    assert info["creators"] == ["Globex Research", "OpenAI", "Meta"]
    assert len(info["held_out_identity_questions"]) >= 10
    assert {q["kind"] for q in info["held_out_questions"]} == {"arithmetic", "capital", "conversion"}

    metrics = json.loads((tiny_model / "eval.json").read_text())
    assert metrics["identity"]["samples"] == 12
    assert set(metrics["identity"]["share_by_creator"]) == {"Globex Research", "OpenAI", "Meta"}
    for key in ("arithmetic_accuracy", "fact_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert "Globex Research" in (tiny_model / "README.md").read_text()


def test_transformers_loads_it_and_generates_with_the_chat_template(tiny_model: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model: Any = AutoModelForCausalLM.from_pretrained(tiny_model)
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token == "<|end|>"
    assert model.generation_config.eos_token_id == end_id

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who made you?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|system|>\nBe brief.<|end|>\n<|user|>\nWho made you?<|end|>\n<|assistant|>\n"
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_rebuild_needs_force_replaces_atomically_and_gives_the_same_weights(tiny_model: Path, tmp_path: Path):
    again = tmp_path / "demo"
    again.mkdir()
    (again / "marker").write_text("an older build")
    refused = build(again, "--seed", "3", "--org", "Globex Research")
    assert refused.returncode == 1
    assert (again / "marker").exists()

    replaced = build(again, "--seed", "3", "--org", "Globex Research", "--force")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert not (again / "marker").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo.")]

    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_model)  # deterministic from the seed
