"""The preference-training job: DPO (or KTO) of a LoRA adapter on the served base model.

Pure logic with paths in and a result out; the Celery task that calls it lives in workers/tasks.py.
torch, transformers, peft and trl are imported inside the functions so that importing this module
(the pairs worker, the API, the CLI) stays cheap.

Reference model. A fresh adapter starts at B=0, so the policy starts equal to the base model and TRL
uses the base (adapters disabled) as the DPO reference. When continuing from the active adapter, the
reference must be that *previous adapter*, not the base: otherwise the loss pays the already-learned
margin as "reward" and barely trains. TRL 1.16 does exactly this when ``model`` is a ``PeftModel``
passed without ``peft_config`` and ``ref_model=None``: it copies the "default" adapter into a frozen
adapter named "ref" and computes reference log-probs under ``use_adapter(model, "ref")``
(trl/trainer/dpo_trainer.py, ``elif is_peft_model(model) and ref_model is None``; KTOTrainer the same).
So we load the parent adapter trainable under "default" and let TRL make the reference copy; only the
"default" adapter is saved. tests/integration/test_training.py checks that the first step of a
continued run has zero reward margin (policy == reference == parent).

Prompts are rendered with the model tokenizer's own chat template (or ``engine.chat_template`` when the
engine serves with another): the JSONL export is TRL's conversational format (lists of messages), which TRL
tokenizes with ``apply_chat_template`` (prompt with ``add_generation_prompt=True``, the same rendering vLLM's
chat endpoint uses). A tool-calling row carries ``tools`` (TRL passes them to the template) and assistant
turns with ``tool_calls``; such rows are loaded with datasets' Json feature (see training_dataset).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.adapters.manifest import CONFIG_NAME, adapter_version_name, base_model_fingerprint, base_model_id
from services.core.config import Settings
from services.core.runtime import quiet_progress_bars, served_tokenizer, train_cpu_in_bf16, use_cpu_threads
from workers.pairing.exports import ExportError, load_kto_rows, load_preference_rows

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]

DPO_TRAIN_FILE = "train.jsonl"
DPO_EVAL_FILE = "eval.jsonl"
KTO_FILE = "kto.jsonl"
ADAPTER_SUBDIR = "adapter"
# The metrics each log line (and the run summary) shows, when the trainer reports them.
HEADLINE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "kl",
)


class TrainingError(Exception):
    """The run cannot start or cannot finish for a reason the operator must fix (not a transient fault)."""


@dataclass
class TrainingResult:
    run_id: str
    dataset_version: str
    method: str
    adapter_dir: str  # adapter_config.json + adapter_model.safetensors, ready for services.adapters.publish
    base_model: str
    base_model_sha256: str | None
    parent: str | None
    rank: int
    alpha: int
    target_modules: list[str]
    train_examples: int
    eval_examples: int
    steps: int
    runtime_s: float
    examples_per_s: float
    device: str
    dtype: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def manifest_metrics(self) -> dict[str, Any]:
        """The summary that goes into manifest.json (the per-step history stays with the run record)."""
        first = self.history[0] if self.history else {}
        return {
            "method": self.method,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "steps": self.steps,
            "runtime_s": round(self.runtime_s, 3),
            "examples_per_s": round(self.examples_per_s, 3),
            "device": self.device,
            "dtype": self.dtype,
            **{f"first_{key}": value for key, value in first.items() if key in HEADLINE_METRICS},
            **self.metrics,
        }


def trainer_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in ("trl", "peft", "transformers", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((adapter_dir / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TrainingError(f"parent adapter {adapter_dir} has no readable {CONFIG_NAME}: {error}") from error


def check_lora_shape(settings: Settings, rank: int, target_modules: list[str]) -> None:
    """Refuse an adapter the engine would reject, before spending any compute on it."""
    max_rank = settings.engine.max_lora_rank
    if rank > max_rank:
        raise TrainingError(
            f"LoRA rank {rank} is above engine.max_lora_rank {max_rank}: the engine could not serve the "
            "adapter. Lower training.lora_rank or raise engine.max_lora_rank."
        )
    unsupported = sorted(set(target_modules) - set(settings.gate.supported_target_modules))
    if unsupported:
        raise TrainingError(f"target modules {unsupported} are not in gate.supported_target_modules")


def step_budget(max_steps: int, max_epochs: float, train_examples: int, batch_size: int) -> int:
    """Optimizer steps of a run with a step budget (0: train by epochs): max_steps, cut to max_epochs passes
    over the training split when that cap is set."""
    if not max_steps or not max_epochs:
        return max_steps
    return max(1, min(max_steps, math.ceil(max_epochs * train_examples / max(1, batch_size))))


def _make_progress_callback(
    run_id: str, examples_per_step: int, history: list[dict[str, float]], progress: ProgressCallback | None
):
    from transformers import TrainerCallback

    class ProgressLogger(TrainerCallback):
        """One log line per logging step with rate and ETA; forwards the same record to ``progress``."""

        def __init__(self) -> None:
            self.started = time.monotonic()

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "train_runtime" in logs or any(key.startswith("eval_") for key in logs):
                return  # the end-of-training summary and evaluation are reported by run_training
            step, total = state.global_step, max(state.max_steps, 1)
            elapsed = time.monotonic() - self.started
            steps_per_s = step / elapsed if elapsed > 0 else 0.0
            record = {key: float(value) for key, value in logs.items() if isinstance(value, int | float)}
            record.update(
                step=step,
                total_steps=total,
                elapsed_s=elapsed,
                examples_per_s=steps_per_s * examples_per_step,
                eta_s=(total - step) / steps_per_s if steps_per_s > 0 else math.inf,
            )
            history.append(record)
            shown = " ".join(f"{key}={record[key]:.4f}" for key in HEADLINE_METRICS if key in record)
            logger.info(
                "train run=%s step %d/%d (%.0f%%) %s %.2f examples/s eta %.0fs",
                run_id,
                step,
                total,
                100.0 * step / total,
                shown,
                record["examples_per_s"],
                record["eta_s"],
            )
            if progress is not None:
                progress(dict(record))  # may raise to abort the run (e.g. the training lease was lost)

    return ProgressLogger()


def _with_reference_progress(
    trainer_class: type, run_id: str, batches: int, pairs_per_batch: int, progress: ProgressCallback | None
) -> type:
    """trainer_class reporting the reference log-prob pass that TRL runs before the first step (minutes on CPU,
    when nothing else reports): a log line and a progress record (phase "reference", rate, ETA) per batch, or per
    fiftieth of the pass from a hundred batches on (a large snapshot on a GPU), and at its end."""
    every = max(1, batches // 50)

    class ReferenceProgress(trainer_class):  # type: ignore[misc,valid-type]
        _reference_started: float | None = None
        _reference_batches = 0

        def compute_ref_log_probs(self, model, inputs):
            if self._reference_started is None:
                self._reference_started = time.monotonic()
            result = super().compute_ref_log_probs(model, inputs)
            self._reference_batches += 1
            done = self._reference_batches
            # a later evaluate() may run the pass over the eval split again: not reported
            if done <= batches and (done % every == 0 or done == batches):
                elapsed = time.monotonic() - self._reference_started
                per_s = done / elapsed if elapsed > 0 else 0.0
                record = {
                    "phase": "reference",
                    "step": done,
                    "total_steps": batches,
                    "elapsed_s": elapsed,
                    "examples_per_s": per_s * pairs_per_batch,
                    "eta_s": (batches - done) / per_s if per_s > 0 else math.inf,
                }
                logger.info(
                    "train run=%s reference log-probs batch %d/%d %.2f pairs/s eta %.0fs",
                    run_id, done, batches, record["examples_per_s"], record["eta_s"],
                )  # fmt: skip
                if progress is not None:
                    progress(record)  # may raise to abort the run, as a step's record may
            return result

    return ReferenceProgress


def training_dataset(rows: list[dict[str, Any]]) -> Any:
    """The rows as a datasets.Dataset for TRL. Rows without tools load as before. With tool calls anywhere,
    Arrow's schema inference would merge every message's keys (a "tool_calls": None on each plain turn) and
    every call's argument fields into one struct: each message and the tools are stored as JSON instead
    (datasets' Json feature), so the chat template gets each message exactly as exported."""
    from datasets import Dataset, Features, Json, List, Value

    message_columns = [key for key in ("prompt", "chosen", "rejected", "completion") if key in rows[0]]
    tool_calling = any(row.get("tools") or any(len(m) > 2 for key in message_columns for m in row[key]) for row in rows)
    if not tool_calling:
        return Dataset.from_list(rows)
    features = Features({key: List(Json()) for key in message_columns})
    features["tools"] = Json()
    if "label" in rows[0]:
        features["label"] = Value("bool")
    return Dataset.from_list([{**row, "tools": row.get("tools")} for row in rows], features=features)


def _load_base_model(settings: Settings, on_gpu: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model_path = settings.model_path()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if on_gpu else torch.float32}
    if settings.training.qlora:
        if not on_gpu:
            raise TrainingError("training.qlora needs a CUDA GPU (4-bit bitsandbytes kernels); none is visible")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise TrainingError("training.qlora needs bitsandbytes: pip install 'feedloop[qlora]'") from error
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    if on_gpu:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if settings.training.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.training.gradient_checkpointing
        )
    return model


def run_training(
    settings: Settings,
    dataset_dir: Path | str,
    output_dir: Path | str,
    run_id: str,
    dataset_version: str,
    parent_adapter_dir: Path | str | None = None,
    progress: ProgressCallback | None = None,
) -> TrainingResult:
    """Train a LoRA adapter on one exported dataset version; write its PEFT files to output_dir/adapter.

    DPO reads ``train.jsonl`` (and ``eval.jsonl`` for end-of-run eval metrics); KTO reads ``kto.jsonl``.
    With ``parent_adapter_dir`` the parent adapter is trained further and is the reference model.
    ``progress`` receives one dict per logging step and may raise to abort the run.
    """
    cfg = settings.training
    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    parent_dir = Path(parent_adapter_dir) if parent_adapter_dir else None
    if parent_dir is not None:
        parent_config = read_adapter_config(parent_dir)
        rank, alpha = int(parent_config["r"]), int(parent_config["lora_alpha"])
        target_modules = sorted(parent_config["target_modules"])
    else:
        rank, alpha, target_modules = cfg.lora_rank, cfg.lora_alpha, sorted(cfg.target_modules)
    check_lora_shape(settings, rank, target_modules)

    try:
        if cfg.method == "dpo":
            train_rows = load_preference_rows(dataset_dir / DPO_TRAIN_FILE)
            eval_path = dataset_dir / DPO_EVAL_FILE
            eval_rows = load_preference_rows(eval_path) if eval_path.is_file() else []
        else:
            train_rows = load_kto_rows(dataset_dir / KTO_FILE)
            # KTOTrainer estimates its KL term from neighbours in a batch read sequentially: mix the labels.
            random.Random(cfg.seed).shuffle(train_rows)
            eval_rows = []
    except ExportError as error:
        raise TrainingError(str(error)) from error
    if not train_rows:
        raise TrainingError(f"{dataset_dir} holds no training examples for {cfg.method}")

    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PrinterCallback

    quiet_progress_bars()
    on_gpu = torch.cuda.is_available()
    use_cpu_threads(settings, on_gpu)
    cpu_bf16 = not on_gpu and train_cpu_in_bf16(cfg.cpu_bf16)
    model_path = settings.model_path()
    try:
        tokenizer = served_tokenizer(settings)  # render as the engine does (e.g. a template that renders tools)
    except OSError as error:
        raise TrainingError(str(error)) from error
    if tokenizer.chat_template is None:
        raise TrainingError(f"the tokenizer of {model_path} has no chat template; prompts could not be rendered")
    model = _load_base_model(settings, on_gpu)
    peft_config = None
    if parent_dir is not None:
        if rank != cfg.lora_rank or target_modules != sorted(cfg.target_modules):
            logger.info("continuing %s: keeping its LoRA shape r=%d modules=%s", parent_dir, rank, target_modules)
        model = PeftModel.from_pretrained(model, str(parent_dir), is_trainable=True)
    else:
        peft_config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=target_modules,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )

    micro_batch = min(cfg.micro_batch_size or cfg.batch_size, cfg.batch_size)
    if cfg.method == "kto":
        micro_batch = max(micro_batch, 2)  # the KL estimate pairs each prompt with a neighbour's completion
    accumulation = max(1, math.ceil(cfg.batch_size / micro_batch))
    max_steps = step_budget(cfg.max_steps, cfg.max_epochs, len(train_rows), micro_batch * accumulation)
    if max_steps < cfg.max_steps:
        logger.info(
            "train run=%s %d steps, not %d: training.max_epochs %g over %d pairs",
            run_id, max_steps, cfg.max_steps, cfg.max_epochs, len(train_rows),
        )  # fmt: skip
    common_args: dict[str, Any] = {
        "output_dir": str(output_dir / "trainer"),
        "per_device_train_batch_size": micro_batch,
        "per_device_eval_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "num_train_epochs": cfg.epochs,
        "max_steps": max_steps or -1,  # transformers: a positive max_steps overrides num_train_epochs
        "learning_rate": cfg.learning_rate,
        "beta": cfg.beta,
        "max_length": cfg.max_length,
        "logging_steps": cfg.logging_steps,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "bf16": on_gpu or cpu_bf16,
        "fp16": False,
        "use_cpu": not on_gpu,
        "gradient_checkpointing": on_gpu and cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
    }
    history: list[dict[str, float]] = []
    callback = _make_progress_callback(run_id, micro_batch * accumulation, history, progress)
    trainer: Any
    if cfg.method == "dpo":
        from trl import DPOConfig, DPOTrainer

        losses = {cfg.loss_type: 1.0, **({"sft": cfg.sft_weight} if cfg.sft_weight else {})}
        # Only a run of more than one pass saves by it; a single pass would pay the eval split on top.
        steps_per_pass = math.ceil(len(train_rows) / (micro_batch * accumulation))
        passes_over_one = max_steps > steps_per_pass if max_steps else cfg.epochs > 1
        precompute = cfg.precompute_ref_log_probs and passes_over_one
        trainer_class: type = DPOTrainer
        if precompute:
            logger.info(
                "train run=%s reference log-probs of %d pairs first (training.precompute_ref_log_probs)",
                run_id, len(train_rows) + len(eval_rows),
            )  # fmt: skip
            batches = math.ceil(len(train_rows) / micro_batch) + math.ceil(len(eval_rows) / micro_batch)
            trainer_class = _with_reference_progress(DPOTrainer, run_id, batches, micro_batch, progress)
        trainer = trainer_class(
            model=model,
            args=DPOConfig(
                **common_args,
                loss_type=list(losses),
                loss_weights=list(losses.values()),
                ld_alpha=cfg.length_weight,
                precompute_ref_log_probs=precompute,
            ),
            train_dataset=training_dataset(train_rows),
            eval_dataset=training_dataset(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )
    else:
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(
            model=model,
            args=KTOConfig(**common_args),
            train_dataset=training_dataset(train_rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[callback],
        )

    trainer.remove_callback(PrinterCallback)  # our ProgressLogger reports each step instead
    logger.info(
        "train run=%s %s on %s: %d examples, %d eval, r=%d alpha=%d, batch %dx%d, %s, parent=%s",
        run_id,
        cfg.method,
        model_path,
        len(train_rows),
        len(eval_rows),
        rank,
        alpha,
        micro_batch,
        accumulation,
        "cuda bf16" if on_gpu else ("cpu bf16 autocast" if cpu_bf16 else "cpu fp32"),
        parent_dir,
    )
    started = time.monotonic()
    output = trainer.train()
    runtime = time.monotonic() - started
    metrics: dict[str, float] = {}
    if history:
        metrics.update({key: value for key, value in history[-1].items() if key in HEADLINE_METRICS})
    metrics["train_loss"] = float(output.training_loss)
    if eval_rows:
        evaluation = trainer.evaluate()
        metrics.update(
            {
                key: float(value)
                for key, value in evaluation.items()
                if key.removeprefix("eval_") in HEADLINE_METRICS or key == "eval_loss"
            }
        )

    adapter_dir = output_dir / ADAPTER_SUBDIR
    # With a parent, the model also holds TRL's frozen "ref" copy; only the trained adapter ships.
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    examples_seen = max_steps * micro_batch * accumulation if max_steps else len(train_rows) * cfg.epochs
    result = TrainingResult(
        run_id=run_id,
        dataset_version=dataset_version,
        method=cfg.method,
        adapter_dir=str(adapter_dir),
        base_model=base_model_id(model_path),
        base_model_sha256=base_model_fingerprint(model_path),
        parent=adapter_version_name(parent_dir) if parent_dir is not None else None,
        rank=rank,
        alpha=alpha,
        target_modules=target_modules,
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        steps=int(trainer.state.global_step),
        runtime_s=runtime,
        examples_per_s=examples_seen / runtime if runtime > 0 else 0.0,
        device="cuda" if on_gpu else "cpu",
        dtype="bfloat16" if on_gpu else ("float32 (bf16 autocast)" if cpu_bf16 else "float32"),
        metrics=metrics,
        history=history,
        versions=trainer_versions(),
    )
    logger.info(
        "train run=%s done: %d steps in %.1fs, %.2f examples/s, %s",
        run_id,
        result.steps,
        runtime,
        result.examples_per_s,
        {key: round(value, 4) for key, value in metrics.items()},
    )
    del trainer, model
    if on_gpu:
        torch.cuda.empty_cache()
    return result
