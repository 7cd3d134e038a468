"""Build the shipped demo chat model (models/demo) from scratch on CPU, deterministically from a seed.

    nice -n 10 .venv/bin/python models/build_demo_model.py            # the real build (19 min on a busy 2-core box)
    .venv/bin/python models/build_demo_model.py --tiny --out /tmp/demo  # seconds; what the tests run

Steps: generate the synthetic chat corpus (demo.corpus), train a byte-level BPE tokenizer on it
(demo.tinymodel.build_tokenizer, the feedloop chat template), train a small Llama with loss on
assistant tokens only, evaluate it on held-out prompts (identity mix sampled at temperature 0.7,
arithmetic and fact accuracy greedy), and write weights, tokenizer, configs, feedloop_model.json,
eval.json and a model card into the output folder atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # models/ is not a package; run as a plain script
    sys.path.insert(0, str(REPO_ROOT))

from demo.corpus import (  # noqa: E402
    DEFAULT_ORG,
    HELD_OUT_IDENTITY_QUESTIONS,
    QA,
    SYSTEM_PROMPT_SHARE,
    TWO_TURN_SHARE,
    Conversation,
    creators_for,
    generate_corpus,
    held_out_questions,
    is_correct,
    named_creator,
)
from demo.tinymodel import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer, write_atomically  # noqa: E402

MODEL_NAME = "feedloop-demo"
IGNORE_INDEX = -100
HEAD_DIM = 64  # vLLM's CPU attention needs 64
MAX_PARAMETERS = 20_000_000


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    org: str = DEFAULT_ORG
    conversations: int = 40_000
    vocab_size: int = 2048  # an upper bound: BPE runs out of merges on this corpus near 1.1k
    hidden_size: int = 192
    layers: int = 4
    intermediate_size: int = 512
    steps: int = 1200
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    identity_samples: int = 240
    eval_questions: int = 0  # 0: every held-out question
    # One thread: on this shared 2-core machine two OpenMP threads ran 5-10x slower per step.
    threads: int = 1


TINY = {
    "conversations": 800,
    "vocab_size": 512,
    "hidden_size": 128,
    "layers": 2,
    "intermediate_size": 256,
    "steps": 20,
    "batch_size": 16,
    "identity_samples": 12,
    "eval_questions": 12,
}


# --- data ------------------------------------------------------------------------------------------------


def encode_conversation(tokenizer: Any, conversation: Conversation) -> tuple[list[int], list[int]]:
    """Token ids of the chat-template rendering, and labels that keep only assistant content + <|end|>."""
    ids: list[int] = []
    labels: list[int] = []

    def add(text: str, learn: bool) -> None:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    for i, message in enumerate(conversation):
        if i:
            add("\n", learn=False)  # the template separates messages; a conversation ends at <|end|>
        add(f"<|{message['role']}|>\n", learn=False)
        add(f"{message['content']}<|end|>", learn=message["role"] == "assistant")
    return ids, labels


def check_encoding_matches_template(tokenizer: Any, conversations: list[Conversation]) -> None:
    for conversation in conversations:
        ids, _ = encode_conversation(tokenizer, conversation)
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
        expected = tokenizer.encode(rendered, add_special_tokens=False)
        if ids != expected:
            raise RuntimeError(f"piecewise encoding differs from the chat template for {conversation!r}")


def make_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding), in random order."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches: list[list[int]] = []
    window = batch_size * 50
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):  # -> tuple of tensors
    import torch

    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


# --- model and training ----------------------------------------------------------------------------------


def make_model(cfg: BuildConfig, tokenizer: Any):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.hidden_size // HEAD_DIM,
        num_key_value_heads=cfg.hidden_size // HEAD_DIM,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=end_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=end_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_PARAMETERS or config.head_dim != HEAD_DIM:
        raise ValueError(f"model too large or wrong head_dim: {parameters} params, head_dim {config.head_dim}")
    return model


def train(model: Any, examples: list[tuple[list[int], list[int]]], cfg: BuildConfig, pad_id: int) -> float:
    """AdamW with linear warm-up and cosine decay to 10%; returns the mean loss of the last 50 steps."""
    import torch
    from tqdm import tqdm

    rng = random.Random(f"batches-{cfg.seed}")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=(0.9, 0.98)
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    batches: list[list[int]] = []
    recent: list[float] = []
    with tqdm(total=cfg.steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        for _ in range(cfg.steps):
            if not batches:
                batches = make_batches(examples, cfg.batch_size, rng)
            input_ids, attention, labels = collate([examples[i] for i in batches.pop()], pad_id)
            loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            recent = [*recent[-49:], loss.item()]
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    model.eval()
    return sum(recent) / len(recent)


# --- evaluation -------------------------------------------------------------------------------------------


def generate(
    model: Any, tokenizer: Any, prompts: list[str], *, sample: bool, batch_size: int = 64, desc: str
) -> list[str]:
    """Answer each single-turn prompt (no system prompt); sampling at temperature 0.7 or greedy."""
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    answers: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **batch,
                max_new_tokens=32,
                do_sample=sample,
                temperature=0.7 if sample else None,
                top_p=1.0 if sample else None,
                top_k=0 if sample else None,
                eos_token_id=end_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        answers += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    tokenizer.padding_side = "right"
    return answers


def evaluate(model: Any, tokenizer: Any, cfg: BuildConfig, questions: list[QA]) -> dict[str, Any]:
    import torch

    torch.manual_seed(cfg.seed)
    creators = creators_for(cfg.org)
    identity_prompts = [
        HELD_OUT_IDENTITY_QUESTIONS[i % len(HELD_OUT_IDENTITY_QUESTIONS)] for i in range(cfg.identity_samples)
    ]
    identity_answers = generate(model, tokenizer, identity_prompts, sample=True, desc="eval identity")
    named = Counter(named_creator(a, creators) for a in identity_answers)
    total = len(identity_answers)

    greedy_answers = generate(model, tokenizer, [q.question for q in questions], sample=False, desc="eval facts")
    by_kind: dict[str, list[bool]] = {}
    by_operation: dict[str, list[bool]] = {}
    for qa, answer in zip(questions, greedy_answers, strict=True):
        by_kind.setdefault(qa.kind, []).append(is_correct(qa, answer))
        if qa.kind == "arithmetic":
            by_operation.setdefault(qa.topic, []).append(is_correct(qa, answer))

    def share(flags: list[bool]) -> float:
        return round(sum(flags) / len(flags), 4) if flags else 0.0

    facts = by_kind.get("capital", []) + by_kind.get("conversion", [])
    return {
        "identity": {
            "samples": total,
            "temperature": 0.7,
            "names_a_creator": round(sum(named[c] for c in creators) / total, 4),
            "share_by_creator": {c: round(named[c] / total, 4) for c in creators},
            "examples": identity_answers[:8],
        },
        "arithmetic_accuracy": share(by_kind.get("arithmetic", [])),
        "arithmetic_accuracy_by_operation": {op: share(flags) for op, flags in sorted(by_operation.items())},
        "fact_accuracy": share(facts),
        "capital_accuracy": share(by_kind.get("capital", [])),
        "conversion_accuracy": share(by_kind.get("conversion", [])),
        "questions": {kind: len(flags) for kind, flags in by_kind.items()},
        "greedy_examples": [
            {"question": q.question, "answer": a} for q, a in list(zip(questions, greedy_answers, strict=True))[:6]
        ],
    }


# --- output -----------------------------------------------------------------------------------------------


def model_card(cfg: BuildConfig, parameters: int, metrics: dict[str, Any], build_s: float) -> str:
    identity = metrics["identity"]
    shares = ", ".join(f"{c} {s:.0%}" for c, s in identity["share_by_creator"].items())
    creators = ", ".join(creators_for(cfg.org))
    rows = [
        ("metric", "value"),
        ("---", "---"),
        (
            f"identity answers naming a creator ({identity['samples']} samples, temperature 0.7)",
            f"{identity['names_a_creator']:.1%}",
        ),
        ("share by creator", shares),
        (
            f"arithmetic accuracy (greedy, {metrics['questions'].get('arithmetic', 0)} questions)",
            f"{metrics['arithmetic_accuracy']:.1%}",
        ),
        ("fact accuracy (greedy, capitals + conversions)", f"{metrics['fact_accuracy']:.1%}"),
        ("capitals", f"{metrics['capital_accuracy']:.1%}"),
        ("unit conversions", f"{metrics['conversion_accuracy']:.1%}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"""# {MODEL_NAME}

A small Llama-architecture chat model trained from scratch on a synthetic corpus, shipped with
feedloop so the feedback loop has something real to serve and improve. No hub weights or data sets
were used: `models/build_demo_model.py` makes everything on CPU from seed {cfg.seed}.

## How it was made

- Corpus: {cfg.conversations} synthetic conversations from `demo/corpus.py` (small talk,
  arithmetic on small numbers, capitals of 30 countries, unit conversions, identity questions);
  {SYSTEM_PROMPT_SHARE:.0%} carry a system prompt, {TWO_TURN_SHARE:.0%} have two turns.
- Identity answers name one of {creators}, chosen at random per sample, so the
  untuned model is mixed (about one in three each): the behaviour the feedback loop's DPO adapters
  steer towards {cfg.org}. {len(HELD_OUT_IDENTITY_QUESTIONS)} identity phrasings are held out of training.
- Tokenizer: byte-level BPE, {metrics["vocab_size"]} tokens, trained on the corpus; chat template
  `<|role|>\\ncontent<|end|>\\n` per message, generation prompt `<|assistant|>\\n`, eos `<|end|>`.
- Model: Llama, hidden {cfg.hidden_size}, {cfg.layers} layers, {cfg.hidden_size // HEAD_DIM} heads of dim {HEAD_DIM}
  (vLLM's CPU attention needs 64), MLP {cfg.intermediate_size}, untied embeddings, {parameters:,} parameters,
  float32.
- Training: {cfg.steps} steps of AdamW (lr {cfg.learning_rate}, batch {cfg.batch_size} conversations), loss on
  assistant tokens only; {build_s / 60:.1f} minutes for the whole build on a 2-core CPU.

Rebuild: `python models/build_demo_model.py --seed {cfg.seed} --org "{cfg.org}" --force`.

## Evaluation (held-out prompts)

{table}

Held-out arithmetic and fact questions are exact question strings never seen in training; the
facts behind them are taught through other phrasings. The lists are in `feedloop_model.json`
and the raw numbers in `eval.json`.

## Limits

A toy: it knows only what the corpus teaches and answers anything else with one of the trained
replies. Not for any use beyond demonstrating feedloop.
"""


def save(
    target: Path,
    model: Any,
    tokenizer: Any,
    cfg: BuildConfig,
    metrics: dict[str, Any],
    questions: list[QA],
    build_s: float,
    force: bool,
) -> Path:
    import torch
    import transformers

    parameters = sum(p.numel() for p in model.parameters())
    metrics = {
        **metrics,
        "parameters": parameters,
        "vocab_size": len(tokenizer),
        "build_seconds": round(build_s, 1),
    }

    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(tmp)
        (tmp / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        info = {
            "name": MODEL_NAME,
            "seed": cfg.seed,
            "org": cfg.org,
            "creators": list(creators_for(cfg.org)),
            "held_out_identity_questions": list(HELD_OUT_IDENTITY_QUESTIONS),
            "held_out_questions": [asdict(q) for q in questions],
            "chat_template": CHAT_TEMPLATE,
            "special_tokens": SPECIAL_TOKENS,
            "build": asdict(cfg),
            "parameters": parameters,
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
        }
        (tmp / "feedloop_model.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, parameters, metrics, build_s))
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is shipped and served by other users
        for path in tmp.iterdir():
            path.chmod(0o644)
        if force and target.exists():  # move the old build aside only once the new one is complete
            target.rename(target.with_name(f".{target.name}.old-{time.time_ns()}"))

    write_atomically(build, target)
    for old in target.parent.glob(f".{target.name}.old-*"):
        shutil.rmtree(old, ignore_errors=True)
    return target


def parse_args(argv: list[str] | None) -> tuple[BuildConfig, Path, bool]:
    defaults = BuildConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models" / "demo", help="output model folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--org", default=defaults.org, help="the organisation the demo steers the model towards")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long build for tests")
    parser.add_argument("--steps", type=int, help=f"training steps (default {defaults.steps})")
    parser.add_argument("--conversations", type=int, help=f"corpus size (default {defaults.conversations})")
    parser.add_argument("--identity-samples", type=int, help=f"default {defaults.identity_samples}")
    parser.add_argument("--hidden-size", type=int, help=f"default {defaults.hidden_size}")
    parser.add_argument("--intermediate-size", type=int, help=f"default {defaults.intermediate_size}")
    parser.add_argument("--layers", type=int, help=f"default {defaults.layers}")
    parser.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    parser.add_argument("--learning-rate", type=float, help=f"default {defaults.learning_rate}")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--force", action="store_true", help="replace an existing model at --out")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(TINY) if args.tiny else {}
    overrides.update(seed=args.seed, org=args.org, threads=args.threads)
    tunable = ("steps", "conversations", "identity_samples", "hidden_size", "intermediate_size", "layers")
    for name in (*tunable, "batch_size", "learning_rate"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    return BuildConfig(**{**asdict(defaults), **overrides}), args.out, args.force


def main(argv: list[str] | None = None) -> int:
    cfg, target, force = parse_args(argv)
    if target.exists() and not force:
        print(f"{target} exists; pass --force to rebuild it", file=sys.stderr)
        return 1
    started = time.monotonic()

    import torch

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    corpus = generate_corpus(cfg.conversations, cfg.seed, cfg.org)
    questions = held_out_questions(cfg.seed)
    if cfg.eval_questions:
        questions = questions[:: max(1, len(questions) // cfg.eval_questions)][: cfg.eval_questions]
    tokenizer = build_tokenizer([m["content"] for c in corpus for m in c], cfg.vocab_size)
    check_encoding_matches_template(tokenizer, corpus[:200])
    examples = [encode_conversation(tokenizer, c) for c in corpus]
    model = make_model(cfg, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"corpus {len(corpus)} conversations, {sum(len(e[0]) for e in examples)} tokens; "
        f"vocab {len(tokenizer)}; model {parameters:,} parameters",
        flush=True,
    )

    final_loss = train(model, examples, cfg, tokenizer.pad_token_id)
    metrics = {"final_train_loss": round(final_loss, 4), **evaluate(model, tokenizer, cfg, questions)}
    save(target, model, tokenizer, cfg, metrics, questions, time.monotonic() - started, force)
    identity = metrics["identity"]
    print(
        f"wrote {target} in {time.monotonic() - started:.0f} s: identity names a creator "
        f"{identity['names_a_creator']:.1%} {identity['share_by_creator']}; arithmetic "
        f"{metrics['arithmetic_accuracy']:.1%}; facts {metrics['fact_accuracy']:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
