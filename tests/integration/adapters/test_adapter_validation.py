"""Real PEFT adapters for the tiny model: the good one is accepted, each bad one rejected with its reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.adapters.manifest import (
    LLAMA_LORA_MODULES,
    AdapterRejected,
    base_model_fingerprint,
    base_model_id,
    validate_adapter,
)
from tests.support.adapter_corpus import BadAdapter, build_bad_adapter_corpus, build_good_adapter

MAX_RANK = 16


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BadAdapter]]:
    root = tmp_path_factory.mktemp("adapters")
    good = build_good_adapter(tiny_model_dir, root, "feedloop-v1")
    return good, build_bad_adapter_corpus(tiny_model_dir, root, max_lora_rank=MAX_RANK)


def test_good_adapter_is_accepted(adapters, tiny_model_dir: Path) -> None:
    good, _ = adapters
    manifest = validate_adapter(
        good,
        base_model_id(str(tiny_model_dir)),
        MAX_RANK,
        LLAMA_LORA_MODULES,
        served_base_sha256=base_model_fingerprint(str(tiny_model_dir)),
        expected_version="feedloop-v1",
    )
    assert manifest.rank == 8 and manifest.target_modules == sorted(LLAMA_LORA_MODULES)


def test_corpus_covers_every_required_failure(adapters) -> None:
    _, corpus = adapters
    required = {
        "wrong_base_model", "rank_above_max", "unsupported_target_modules",
        "truncated_weights", "sha256_mismatch", "missing_manifest",
    }  # fmt: skip
    assert required <= {case.name for case in corpus}


@pytest.mark.parametrize("with_fingerprint", [False, True])
def test_each_bad_adapter_is_rejected_with_its_reason(adapters, tiny_model_dir: Path, with_fingerprint) -> None:
    _, corpus = adapters
    fingerprint = base_model_fingerprint(str(tiny_model_dir)) if with_fingerprint else None
    outcomes = {}
    for case in corpus:
        try:
            validate_adapter(case.path, base_model_id(str(tiny_model_dir)), MAX_RANK, served_base_sha256=fingerprint)
            outcomes[case.name] = "accepted"
        except AdapterRejected as rejection:
            outcomes[case.name] = rejection.reason
    assert outcomes == {case.name: case.reason for case in corpus}


def test_bad_rank_adapter_really_has_that_rank(adapters) -> None:
    """The rank case is a real rank-32 adapter, not only a manifest that says so."""
    from safetensors import safe_open

    _, corpus = adapters
    rank_case = next(case for case in corpus if case.name == "rank_above_max")
    with safe_open(str(rank_case.path / "adapter_model.safetensors"), "np") as weights:
        shapes = {weights.get_slice(name).get_shape()[0] for name in weights.keys() if "lora_A" in name}  # noqa: SIM118
    assert shapes == {2 * MAX_RANK}
