"""DPO and KTO on exported tool-call rows (real TRL/PEFT on the tiny model, CPU): the chat template that the
engine serves with renders the tools and each answer's tool calls, as the model generated them."""

from __future__ import annotations

import math
from pathlib import Path

import orjson

from services.core.config import Settings
from workers.pairing.datasets import dpo_row
from workers.pairing.exports import load_preference_rows
from workers.training.trainer import run_training, training_dataset

TEMPLATE = Path(__file__).resolve().parents[2] / "support" / "tool_chat_template.jinja"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _pair(i: int, city: str) -> dict:
    call = {
        "id": f"call-{i}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
    }
    return {
        "pair_id": f"p{i}",
        "prompt": [{"role": "user", "content": f"Weather in {city}?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
        "rejected": [{"role": "assistant", "content": f"I do not know about {city}."}],
        "tools": [WEATHER],
    }


def _write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [dpo_row(_pair(i, city)) for i, city in enumerate(["Paris", "Rome", "Oslo", "Lima"])]
    plain = {
        "pair_id": "plain",
        "prompt": [{"role": "user", "content": "Say hi."}],
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }
    (folder / "train.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in [plain, *rows]))
    kto = [
        {"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"], "label": True, "tools": [WEATHER]},
        {"prompt": rows[1]["prompt"], "completion": rows[1]["rejected"], "label": False, "tools": [WEATHER]},
        {"prompt": plain["prompt"], "completion": plain["chosen"], "label": True},
        {"prompt": plain["prompt"], "completion": plain["rejected"], "label": False},
    ]
    (folder / "kto.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kto))
    return folder


def _settings(model_dir: Path, method: str) -> Settings:
    return Settings(
        engine={"model": str(model_dir), "max_lora_rank": 16, "chat_template": str(TEMPLATE)},
        training={
            "method": method,
            "max_steps": 2,
            "batch_size": 2,
            "micro_batch_size": 2,
            "max_length": 256,
            "lora_rank": 4,
            "lora_alpha": 8,
            "cpu_threads": 1,
        },
    )


def test_trl_renders_tool_rows_as_the_model_generated_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The path TRL's DPOTrainer tokenizes with (trl.data_utils._tokenize, tools from the row)."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    rows = load_preference_rows(_write(tmp_path / "ds") / "train.jsonl")
    example = training_dataset(rows)[1]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE.read_text()
    ids = _tokenize(tokenizer, example["prompt"] + example["chosen"], tools=example["tools"])["input_ids"]
    text = tokenizer.decode(ids)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert '"name": "get_weather", "description": "Current weather of a city"' in text  # the tools, in the prompt


def test_dpo_and_kto_train_on_tool_call_rows(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = _write(tmp_path / "ds")
    for method in ("dpo", "kto"):
        result = run_training(_settings(tiny_model_dir, method), dataset, tmp_path / method, f"run-{method}", "ds-1")
        assert result.steps == 2 and result.train_examples == (5 if method == "dpo" else 4)
        assert math.isfinite(result.metrics["train_loss"])
        assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
