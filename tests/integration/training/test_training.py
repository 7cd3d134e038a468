"""The DPO/KTO job, the atomic publish and the evaluation gate on the tiny model (real TRL/PEFT, CPU).

The data (tests/preference_data.py) can only be learned by conditioning on the prompt, so accuracy
well above 50% means real learning. Runs use an SFT term (training.sft_weight) so that greedy
generation stays clean enough for the smoke check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from services.adapters.manifest import base_model_fingerprint, base_model_id, validate_adapter
from tests.support.adapter_corpus import publish_lora
from tests.support.preference_data import FACTS, PROMPT_FORMS, write_dataset
from tests.support.trained_adapters import MAX_RANK, publish_result, training_settings
from workers.evaluation.gate import evaluate_adapter
from workers.training.trainer import TrainingError, TrainingResult, run_training


def validate(path: Path, model_dir: Path, version: str):
    return validate_adapter(
        path,
        base_model_id(str(model_dir)),
        MAX_RANK,
        served_base_sha256=base_model_fingerprint(str(model_dir)),
        expected_version=version,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def dataset(workspace: Path) -> Path:
    return write_dataset(workspace / "datasets" / "ds-1")


@pytest.fixture(scope="module")
def first_run(tiny_model_dir: Path, workspace: Path, dataset: Path) -> tuple[TrainingResult, Path, list[dict]]:
    """A fresh DPO adapter, published as feedloop-v1."""
    records: list[dict] = []
    result = run_training(
        training_settings(tiny_model_dir),
        dataset,
        workspace / "runs" / "run-1",
        "run-1",
        "ds-1",
        progress=records.append,
    )
    return result, publish_result(result, workspace / "adapters", "feedloop-v1"), records


def test_dpo_run_writes_a_valid_adapter_and_learns(first_run, tiny_model_dir: Path) -> None:
    result, adapter, records = first_run
    manifest = validate(adapter, tiny_model_dir, "feedloop-v1")
    assert (manifest.rank, manifest.alpha, manifest.parent) == (8, 16, None)
    assert (manifest.dataset_version, manifest.run_id) == ("ds-1", "run-1")
    assert manifest.versions["trl"] == "1.16.0" and manifest.versions["peft"].startswith("0.21")
    assert manifest.base_model == str(tiny_model_dir.resolve())

    accuracies = [record["rewards/accuracies"] for record in result.history]
    reference_pass = [record for record in records if record.get("phase") == "reference"]
    assert reference_pass and records[: len(reference_pass)] == reference_pass  # reported before the first step
    records = records[len(reference_pass) :]
    assert len(accuracies) == result.steps == len(records) >= 20
    assert sum(accuracies[:3]) / 3 < 0.6 < 0.9 <= sum(accuracies[-3:]) / 3
    assert result.history[-1]["rewards/margins"] > result.history[0]["rewards/margins"] + 0.5
    assert manifest.metrics["eval_rewards/accuracies"] >= 0.8
    assert manifest.metrics["first_rewards/margins"] == 0.0  # fresh adapter: policy == base == reference
    assert records[-1]["step"] == records[-1]["total_steps"] and records[-1]["eta_s"] == 0
    assert all(record["examples_per_s"] > 0 for record in records)


def test_continuing_trains_the_parent_against_itself(
    first_run, tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    """The previous adapter is the DPO reference: the continued run starts at zero reward margin even
    though the parent already separates the pairs far better than the base model does."""
    from safetensors.numpy import load_file

    parent_result, parent, _ = first_run
    result = run_training(
        training_settings(tiny_model_dir, epochs=1),
        dataset,
        workspace / "runs" / "run-2",
        "run-2",
        "ds-1",
        parent_adapter_dir=parent,
    )
    assert parent_result.history[-1]["rewards/margins"] > 0.5  # the parent's gain over the base
    first = result.history[0]
    assert abs(first["rewards/margins"]) < 1e-4 and abs(first["rewards/chosen"]) < 1e-4

    child = publish_result(result, workspace / "adapters", "feedloop-v2")
    manifest = validate(child, tiny_model_dir, "feedloop-v2")
    assert manifest.parent == "feedloop-v1"
    before = load_file(str(parent / "adapter_model.safetensors"))
    after = load_file(str(child / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # only the trained adapter ships, not TRL's "ref" copy
    assert any(not (before[name] == after[name]).all() for name in before)


def test_cpu_bf16_mixed_precision_learns_and_ships_float32_weights(
    tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    from safetensors import safe_open

    settings = training_settings(tiny_model_dir, cpu_bf16=True)
    result = run_training(settings, dataset, workspace / "runs" / "bf16", "run-bf16", "ds-1")
    assert result.dtype == "float32 (bf16 autocast)"
    accuracies = [record["rewards/accuracies"] for record in result.history]
    assert sum(accuracies[:3]) / 3 < 0.6 < 0.9 <= sum(accuracies[-3:]) / 3
    adapter = publish_result(result, workspace / "adapters", "feedloop-bf16")
    validate(adapter, tiny_model_dir, "feedloop-bf16")
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.float32"}  # noqa: SIM118


def test_kto_trains_on_the_unpaired_export(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    settings = training_settings(tiny_model_dir, method="kto", epochs=2, lora_rank=4, lora_alpha=8)
    result = run_training(settings, dataset, workspace / "runs" / "kto", "run-kto", "ds-1")
    assert result.method == "kto" and result.train_examples == 72 and result.rank == 4
    assert "kl" in result.history[-1] and result.history[-1]["loss"] < result.history[0]["loss"]
    manifest = validate(publish_result(result, workspace / "adapters", "feedloop-kto"), tiny_model_dir, "feedloop-kto")
    assert manifest.metrics["method"] == "kto" and manifest.rank == 4


def test_gate_passes_the_trained_adapter(first_run, tiny_model_dir: Path, dataset: Path) -> None:
    _, adapter, _ = first_run
    gate = evaluate_adapter(training_settings(tiny_model_dir), adapter, dataset / "eval.jsonl")
    assert gate.passed, gate.reasons
    metrics = gate.to_dict()["metrics"]
    assert metrics["reference"] == "base" and metrics["eval_pairs"] == 24
    assert metrics["candidate"]["accuracy"] >= 0.9 > metrics["reference_score"]["accuracy"]
    low, high = metrics["candidate"]["accuracy_interval"]
    assert low < metrics["candidate"]["accuracy"] <= high  # Wilson, 95%: 24 pairs leave a wide interval
    comparison = metrics["comparison"]
    assert comparison["lower"] > 0 and comparison["only_second"] <= 1  # better than base on the same pairs
    assert metrics["rule"]["compare_to_active"] == "not_worse"
    outputs = [smoke["output"] for smoke in metrics["smoke"]]
    assert len(set(outputs)) == len(outputs) and all(output.strip() for output in outputs)
    assert sum(output in FACTS.values() for output in outputs) >= 2  # it learned the answers


def test_an_adapter_that_ties_the_active_one_passes_unless_it_must_beat_it(
    first_run, tiny_model_dir: Path, dataset: Path
) -> None:
    _, adapter, _ = first_run
    settings = training_settings(tiny_model_dir)
    gate = evaluate_adapter(settings, adapter, dataset / "eval.jsonl", active_adapter_dir=adapter)
    # not_worse (default): not worse within the interval, so it passes and live votes decide.
    assert gate.passed, gate.reasons
    comparison = gate.metrics["comparison"]
    assert gate.metrics["reference"] == "feedloop-v1" and comparison["difference"] == 0
    assert comparison["only_first"] == comparison["only_second"] == 0 and comparison["lower"] < 0 < comparison["upper"]
    settings.gate.compare_to_active = "beat"
    strict = evaluate_adapter(settings, adapter, dataset / "eval.jsonl", active_adapter_dir=adapter)
    assert not strict.passed
    assert len(strict.reasons) == 1 and strict.reasons[0].startswith("does not beat feedloop-v1")


def test_gate_fails_flipped_and_random_adapters(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    settings = training_settings(tiny_model_dir)
    flipped_data = write_dataset(workspace / "datasets" / "flipped", flip=True)
    flipped = run_training(settings, flipped_data, workspace / "runs" / "flipped", "run-flip", "flipped")
    random_lora = publish_lora(tiny_model_dir, workspace / "adapters", "feedloop-random", seed=3)

    gates = {
        name: evaluate_adapter(settings, path, dataset / "eval.jsonl")
        for name, path in (("flipped", flipped.adapter_dir), ("random", random_lora))
    }
    for gate in gates.values():
        assert not gate.passed
        assert any("below gate.min_accuracy" in reason for reason in gate.reasons), gate.reasons
        assert gate.to_dict()["metrics"]["candidate"]["accuracy"] < 0.75
        # Each comparison with the base is reported with its paired interval; on 24 pairs neither adapter is
        # shown worse than the base (the flipped one collapses to 0.5), so the accuracy floor and the smoke
        # check are what stop them here.
        comparison = gate.metrics["comparison"]
        assert comparison["lower"] <= comparison["difference"] <= comparison["upper"]
        assert gate.metrics["rule"]["compare_to_active"] == "not_worse"


def test_gate_fails_an_adapter_that_loops_where_the_active_one_does_not(
    first_run, tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    """The random-weight tiny base loops on its own; the trained feedloop-v1 answers cleanly, and the gate judges a
    candidate's smoke answers against the version it would replace."""
    _, active, _ = first_run
    settings = training_settings(tiny_model_dir)
    looping = publish_lora(tiny_model_dir, workspace / "adapters", "feedloop-looping", seed=3, fill=0.5)
    gate = evaluate_adapter(settings, looping, dataset / "eval.jsonl", active_adapter_dir=active)
    assert not gate.passed and gate.metrics["reference"] == "feedloop-v1"
    candidate, reference = gate.metrics["smoke"], gate.metrics["reference_smoke"]
    assert [s["prompt"] for s in candidate] == [s["prompt"] for s in reference] == settings.gate.smoke_prompts
    assert all(s["ok"] for s in reference) and not any(s["ok"] for s in candidate), (candidate, reference)
    smoke_reasons = [reason for reason in gate.reasons if reason.startswith("smoke:")]
    assert len(smoke_reasons) >= len(candidate), gate.reasons  # each prompt named (and the collapse, if any)
    assert gate.metrics["rule"]["smoke_max_failed_share"] == settings.gate.smoke_max_failed_share


def test_retention_fails_a_candidate_that_forgets_what_the_reference_answers(
    first_run, tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    _, adapter, _ = first_run
    cases = workspace / "retention.jsonl"
    rows = [
        {"prompt": f"Tell me about {topic}.", "expected": answer.split(" is ")[-1], "kind": kind}
        for (topic, answer), kind in zip(FACTS.items(), ["capital", "capital", "arithmetic"], strict=True)
    ]
    rows.append({"messages": [{"role": "user", "content": "What do you know about Mars?"}], "expected": ["Olympus"]})
    cases.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = training_settings(tiny_model_dir)
    settings.gate.retention_file = cases

    same = evaluate_adapter(settings, adapter, dataset / "eval.jsonl", active_adapter_dir=adapter)
    assert same.passed, same.reasons
    retention = same.metrics["retention"]
    # the trained adapter answers the facts it learned, not the one it never saw (reported, not counted)
    assert retention["cases"] == 4 and retention["reference_right"] >= 2 and retention["rate"] == 1.0

    forgetful = publish_lora(tiny_model_dir, workspace / "adapters", "feedloop-forgets", seed=5)
    forgets = evaluate_adapter(settings, forgetful, dataset / "eval.jsonl", active_adapter_dir=adapter)
    failures = [reason for reason in forgets.reasons if reason.startswith("retention")]
    assert len(failures) == 1 and "below gate.min_retention 0.9" in failures[0], forgets.reasons
    assert forgets.metrics["retention"]["rate"] < 0.9 and forgets.metrics["retention"]["lost"]
    # each kind is judged on its own too (the Mars case has none: it is a group of its own)
    by_kind = forgets.metrics["retention"]["by_kind"]
    assert set(by_kind) == {"capital", "arithmetic", "(no kind)"}
    assert sum(part["cases"] for part in by_kind.values()) == 4
    lost_kinds = [kind for kind, part in by_kind.items() if part["rate"] < 0.9]
    kind_failures = [reason for reason in forgets.reasons if reason.startswith("regression kind")]
    assert lost_kinds and len(kind_failures) == len(lost_kinds), forgets.reasons

    cases.write_text('{"prompt": "no expected answer"}\n')
    broken = evaluate_adapter(settings, adapter, dataset / "eval.jsonl")
    assert not broken.passed and broken.reasons[0].startswith("gate.retention_file unusable")


def test_the_gate_decides_the_same_at_any_generation_batch_size(
    first_run, tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    """gate.generation_batch_size only changes how many conversations are answered at once: the smoke answers, the
    regression answers and so the decision are those of one-at-a-time answering."""
    _, adapter, _ = first_run
    cases = workspace / "retention-batch.jsonl"
    rows = [
        {"prompt": f"Tell me about {topic}.", "expected": answer.split(" is ")[-1]} for topic, answer in FACTS.items()
    ]
    rows += [{"prompt": f"What is {n} plus {n}?", "expected": str(2 * n)} for n in range(1, 9)]
    cases.write_text("".join(json.dumps(row) + "\n" for row in rows))
    forgetful = publish_lora(tiny_model_dir, workspace / "adapters", "feedloop-forgets-batch", seed=5)
    results = []
    for batch_size in (1, 5, 32):
        settings = training_settings(tiny_model_dir)
        settings.gate.retention_file = cases
        settings.gate.generation_batch_size = batch_size
        results.append(evaluate_adapter(settings, forgetful, dataset / "eval.jsonl", active_adapter_dir=adapter))
    one, *batched = results
    assert one.metrics["retention"]["lost"], "the forgetful adapter must lose something for the check to mean anything"
    for result in batched:
        assert result.passed == one.passed and result.reasons == one.reasons
        assert result.metrics["smoke"] == one.metrics["smoke"]
        assert result.metrics["retention"] == one.metrics["retention"]


def test_retention_non_inferior_weighs_what_a_candidate_gains_against_what_it_loses(
    first_run, tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    """The trained adapter answers the facts the base model does not: under `kept` the base's few right answers are
    all that count; under `non_inferior` its gains count too, and a forgetful adapter still fails."""
    _, adapter, _ = first_run
    cases = workspace / "retention-all.jsonl"
    rows = [
        {"prompt": form.format(topic=topic, i=i), "expected": answer.split(" is ")[-1]}
        for i, form in enumerate(PROMPT_FORMS)
        for topic, answer in FACTS.items()
    ]
    cases.write_text("".join(json.dumps(row) + "\n" for row in rows))
    settings = training_settings(tiny_model_dir)
    settings.gate.retention_file, settings.gate.retention_rule = cases, "non_inferior"

    gains = evaluate_adapter(settings, adapter, dataset / "eval.jsonl")  # against the base model
    assert gains.passed, gains.reasons
    paired = gains.metrics["retention"]["accuracy"]
    assert paired["only_first"] >= 5 and paired["difference"] > 0 and gains.metrics["rule"]["min_retention"] is None
    assert gains.metrics["rule"]["retention_rule"] == "non_inferior"
    assert gains.metrics["rule"]["retention_margin"] == 0.05

    forgetful = publish_lora(tiny_model_dir, workspace / "adapters", "feedloop-forgets-all", seed=5)
    forgets = evaluate_adapter(settings, forgetful, dataset / "eval.jsonl", active_adapter_dir=adapter)
    failures = [reason for reason in forgets.reasons if reason.startswith("regression accuracy")]
    assert len(failures) == 1 and "below -gate.retention_margin" in failures[0], forgets.reasons
    assert forgets.metrics["retention"]["accuracy"]["lower"] < -0.05


def test_pairs_are_rendered_with_the_model_chat_template(tiny_model_dir: Path, dataset: Path) -> None:
    """Training (TRL's conversational format) and the gate score the exact text the engine serves."""
    from transformers import AutoTokenizer

    from workers.evaluation.gate import tokenize_pair
    from workers.pairing.exports import load_preference_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = load_preference_rows(dataset / "eval.jsonl")[0]
    prompt, chosen, rejected = tokenize_pair(tokenizer, row, max_length=128)
    question = row["prompt"][0]["content"]
    assert tokenizer.decode(prompt) == f"<|user|>\n{question}<|end|>\n<|assistant|>\n"
    # A completion ends where the engine stops: at <|end|>, with no token after it.
    assert tokenizer.decode(chosen) == row["chosen"][0]["content"] + "<|end|>"
    assert tokenizer.decode(rejected) == row["rejected"][0]["content"] + "<|end|>"


def test_rank_above_the_engine_maximum_is_refused_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="max_lora_rank 16"):
        run_training(training_settings(tiny_model_dir, lora_rank=32), tmp_path / "none", tmp_path / "out", "r", "d")
    with pytest.raises(TrainingError, match=r"not in gate\.supported_target_modules"):
        settings = training_settings(tiny_model_dir, target_modules=["q_proj", "lm_head"])
        run_training(settings, tmp_path / "none", tmp_path / "out", "r", "d")
    assert not (tmp_path / "out").exists()


def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: QLoRA is allowed")
    with pytest.raises(TrainingError, match="qlora needs a CUDA GPU"):
        run_training(training_settings(tiny_model_dir, qlora=True), dataset, workspace / "runs" / "q", "r", "d")


def test_progress_callback_can_abort_a_run(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    class LeaseLost(Exception):
        pass

    def progress(record: dict) -> None:
        raise LeaseLost(f"lease lost at step {record['step']}")

    with pytest.raises(LeaseLost, match="step 1"):
        run_training(
            training_settings(tiny_model_dir), dataset, workspace / "runs" / "abort", "r", "d", progress=progress
        )
    assert not (workspace / "runs" / "abort" / "adapter").exists()


def test_max_steps_replaces_epochs(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    records: list[dict] = []
    settings = training_settings(tiny_model_dir, max_steps=3, lora_rank=4, lora_alpha=8)  # 5 epochs would be 20+
    result = run_training(settings, dataset, workspace / "runs" / "steps", "run-steps", "ds-1", progress=records.append)
    assert result.steps == len(result.history) == 3
    assert records[-1]["step"] == records[-1]["total_steps"] == 3


def test_max_epochs_cuts_a_step_budget_to_passes_over_a_small_dataset(
    tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    train_pairs = len((dataset / "train.jsonl").read_text().splitlines())
    settings = training_settings(tiny_model_dir, max_steps=1000, max_epochs=1, lora_rank=4, lora_alpha=8)
    result = run_training(settings, dataset, workspace / "runs" / "passes", "run-passes", "ds-1")
    assert result.steps == len(result.history) == math.ceil(train_pairs / 8) < 1000  # batch_size 8: one pass


def test_batched_greedy_answers_are_the_one_by_one_answers(first_run, tiny_model_dir: Path) -> None:
    """The gate generates its smoke and regression answers in left-padded batches: each answer must be the one
    the model gives the conversation alone (prompts of different lengths, answers ending at different steps)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from services.core.runtime import served_tokenizer
    from workers.evaluation.gate import greedy_answers

    _, adapter, _ = first_run
    settings = training_settings(tiny_model_dir)
    tokenizer = served_tokenizer(settings)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    conversations = [[{"role": "user", "content": f"Tell me about {topic}."}] for topic in FACTS]
    conversations += [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "What do you know? " * 6}]]
    one_by_one = [greedy_answers(model, tokenizer, [c], 24, "cpu")[0] for c in conversations]
    batched = greedy_answers(model, tokenizer, conversations, 24, "cpu", batch_size=4)
    assert [text for text, _ in batched] == [text for text, _ in one_by_one]
    assert len({len(tokens) for _, tokens in one_by_one}) > 1  # the answers really end at different lengths


def test_length_weight_reaches_the_dpo_loss_and_one_is_plain_dpo(
    tiny_model_dir: Path, workspace: Path, dataset: Path
) -> None:
    """training.length_weight is LD-DPO's alpha: 1 is plain DPO to the last digit, 0 drops the longer answer's extra
    tokens from the loss (the data's answers differ in length), so the runs part after the first step."""

    def losses(name: str, length_weight: float | None) -> list[float]:
        settings = training_settings(
            tiny_model_dir, max_steps=3, lora_rank=4, lora_alpha=8, logging_steps=1, length_weight=length_weight
        )
        result = run_training(settings, dataset, workspace / "runs" / name, f"run-{name}", "ds-1")
        return [record["loss"] for record in result.history]

    plain, weight_one, weight_zero = losses("ld-none", None), losses("ld-one", 1.0), losses("ld-zero", 0.0)
    assert len(plain) == 3 and plain == pytest.approx(weight_one, rel=1e-6)
    assert weight_zero[0] == pytest.approx(plain[0], rel=1e-6)  # policy = reference: the same log 2 and SFT term
    assert abs(weight_zero[-1] - plain[-1]) > 1e-4, (plain, weight_zero)


def test_loss_type_reaches_the_dpo_loss(tiny_model_dir: Path, workspace: Path, dataset: Path) -> None:
    """training.loss_type picks TRL's pairwise loss. At the first step the policy is the reference (LoRA starts at
    zero), so each loss sits at its value for a zero margin: DPO log 2, IPO (1/(2 beta))^2, the hinge 1; the SFT term
    adds the same amount to each."""

    def first_loss(loss_type: str, beta: float, sft_weight: float) -> float:
        name = f"{loss_type}-{beta}-{sft_weight}"
        settings = training_settings(
            tiny_model_dir,
            max_steps=1,
            lora_rank=4,
            lora_alpha=8,
            logging_steps=1,
            loss_type=loss_type,
            beta=beta,
            sft_weight=sft_weight,
        )
        result = run_training(settings, dataset, workspace / "runs" / name, f"run-{name}", "ds-1")
        return float(result.history[0]["loss"])

    assert first_loss("sigmoid", 0.1, 0.0) == pytest.approx(math.log(2), rel=1e-4)
    assert first_loss("ipo", 0.25, 0.0) == pytest.approx(4.0, rel=1e-4)
    assert first_loss("hinge", 0.1, 0.0) == pytest.approx(1.0, rel=1e-4)
    sft_term = first_loss("sigmoid", 0.1, 1.0) - math.log(2)
    assert sft_term > 0.1
    assert first_loss("hinge", 0.1, 1.0) == pytest.approx(1.0 + sft_term, rel=1e-3)


def test_precomputed_reference_log_probs_train_the_same_as_recomputed(
    tiny_model_dir: Path, workspace: Path, dataset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """training.precompute_ref_log_probs computes the reference once per pair before the first step; a run of more
    than one pass then reads it in the later passes. The loss and the reward margins are the recomputed ones. A run
    of one pass recomputes (precomputing would only add the eval split)."""
    train_pairs = len((dataset / "train.jsonl").read_text().splitlines())
    one_pass = math.ceil(train_pairs / 8)  # batch_size 8

    reported: list[dict[str, Any]] = []  # what the run reports as it goes (the run's history in Redis)

    def history(name: str, steps: int, precompute: bool) -> list[dict[str, float]]:
        caplog.clear()
        reported.clear()
        settings = training_settings(
            tiny_model_dir, max_steps=steps, lora_rank=4, lora_alpha=8, precompute_ref_log_probs=precompute
        )
        out = workspace / "runs" / name
        return run_training(settings, dataset, out, f"run-{name}", "ds-1", progress=reported.append).history

    def precomputed_first() -> bool:
        return any("reference log-probs of" in record.getMessage() for record in caplog.records)

    caplog.set_level("INFO", logger="workers.training.trainer")
    precomputed = history("ref-once", one_pass + 2, True)
    assert precomputed_first()
    # the reference pass reports each batch (rate, ETA) before the first step: train and eval splits, 8 pairs a batch
    eval_pairs = len((dataset / "eval.jsonl").read_text().splitlines())
    batches = math.ceil(train_pairs / 8) + math.ceil(eval_pairs / 8)
    reference = [r for r in reported if r.get("phase") == "reference"]
    assert [r["step"] for r in reference] == list(range(1, batches + 1))
    assert {r["total_steps"] for r in reference} == {batches} and reference[-1]["eta_s"] == 0
    assert all(r["examples_per_s"] > 0 for r in reference)
    assert reported[: len(reference)] == reference and len(reported) == len(reference) + one_pass + 2
    recomputed = history("ref-each-step", one_pass + 2, False)
    assert not precomputed_first()
    assert len(precomputed) == len(recomputed) == one_pass + 2
    for key in ("loss", "rewards/margins", "rewards/chosen"):
        assert [r[key] for r in precomputed] == pytest.approx([r[key] for r in recomputed], rel=1e-3, abs=1e-4), key
    assert abs(precomputed[-1]["rewards/margins"]) > 0.05  # the policy moved, so the reference terms mattered
    history("ref-one-pass", one_pass, True)
    assert not precomputed_first()
