"""Which model `feedloop demo` runs on, and what the demo sets for it.

A profile holds the training knobs the demo's children get (unless the caller's environment sets them), the
simulated users' defaults that differ for that model, and where its held-out sets come from. Nothing here
is special-cased in the product: these are ordinary settings and the users' rubric.

- ``smollm2`` (default): SmolLM2-135M-Instruct, the product's default base model (imported on first use).
  Its held-out questions are ones the base model answers correctly (``demo/select_questions.py``), so
  retention is measured on what it knew.
- ``toy``: the shipped 2.2M-parameter demo model (models/demo), trained here on a synthetic corpus; fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.core.config import DEFAULT_MODEL_DIR, Settings

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"

# Every simulated user comes from 127.0.0.1: the per-IP bucket would throttle all of them as one. The
# per-user buckets stay as configured, so high-volume adversaries still meet 429s.
COMMON_ENV: dict[str, str] = {
    "FEEDLOOP_TRAINING__CHECK_INTERVAL_S": "3",
    # Each round trains a fresh adapter on every pair so far: continuing from the active adapter trains the
    # first round's pairs (and their adversarial noise) twice as long.
    "FEEDLOOP_TRAINING__CONTINUE_FROM_ACTIVE": "false",
    # Weaker answers (liked answer > the base model's answer at high temperature) anchor arithmetic and facts:
    # make them quickly, while the users are still chatting.
    "FEEDLOOP_PAIRS__GENERATE_INTERVAL_S": "3",
    "FEEDLOOP_PAIRS__GENERATION_BATCH": "64",
    "FEEDLOOP_PAIRS__GENERATION_CONCURRENCY": "8",
    "FEEDLOOP_PAIRS__GENERATION_MAX_TOKENS": "48",
    "FEEDLOOP_FEEDBACK__RATE_PER_IP": "100000",
    "FEEDLOOP_FEEDBACK__BURST_PER_IP": "100000",
}


@dataclass(frozen=True)
class DemoProfile:
    name: str
    env: Mapping[str, str]
    simulate: Mapping[str, Any] = field(default_factory=dict)
    info_file: Path | None = None  # held-out sets; None: the model folder's feedloop_model.json
    # questions users ask (never the held-out ones) written as the gate's regression set (gate.retention_file)
    gate_retention_cases: int = 0
    rounds: int = 2  # `feedloop demo`'s default rounds and final chats for this model
    final_chats: int = 200

    def model_path(self, settings: Settings) -> str:
        """The base model the demo serves (an explicit FEEDLOOP_ENGINE__MODEL wins)."""
        if settings.engine.model:
            return settings.engine.model
        if self.name == "toy":
            return str(DEFAULT_MODEL_DIR)
        from services.cli.models import ensure_default_model

        return ensure_default_model(settings)


TOY = DemoProfile(
    "toy",
    {
        **COMMON_ENV,
        # 300, not 200: the trigger now fires on time (checked where pairs are written), and one round on ~200
        # pairs moved the held-out target rate by only ~30 points; 280-590-pair snapshots moved it 45-50.
        "FEEDLOOP_TRAINING__MIN_PAIRS": "300",
        # A fixed budget of optimizer steps, not epochs: how many pairs the trigger's snapshot holds varies with
        # timing, and 6 epochs over the larger sets overtrained the model into wrong arithmetic.
        "FEEDLOOP_TRAINING__MAX_STEPS": "80",
        # ... but at most 10 passes: a CI run whose snapshot kept only 78 training pairs (13 voters judged unreliable)
        # trained 16 passes and lost 12.5 points of arithmetic; retrained at 10 passes (49 steps) it lost 7.5 and
        # still reached 87.5%. Snapshots of 128 training pairs or more keep all 80 steps.
        "FEEDLOOP_TRAINING__MAX_EPOCHS": "10",
        "FEEDLOOP_TRAINING__LEARNING_RATE": "0.002",
        # beta 0.5 stops pushing once a pair is clearly separated, which spares arithmetic and facts; a little
        # SFT on the chosen answers keeps the small model's greedy answers intact.
        "FEEDLOOP_TRAINING__BETA": "0.5",
        "FEEDLOOP_TRAINING__SFT_WEIGHT": "0.3",
    },
)

SMOLLM2 = DemoProfile(
    "smollm2",
    {
        **COMMON_ENV,
        # ~400 pairs stored from the users' identity and ordinary questions (corrections, liked answer > the base
        # model's high-temperature answer, liked > disliked): the mix that moves identity and keeps the facts.
        "FEEDLOOP_TRAINING__MIN_PAIRS": "400",
        # No wait for the generated pairs pending at the trigger: the users keep chatting through it, and in three
        # demos with the 120 s default the snapshots grew from ~400 to 617-625 stored pairs, mostly corrections,
        # and dropped 5.8-7.7 held-out points (capitals unasked by the users, in the corrections' one sentence).
        "FEEDLOOP_TRAINING__GENERATION_WAIT_S": "0",
        # Passes over the training split, not a fixed step count: the trigger's snapshot keeps 140-190 training
        # pairs (pairs land in batches, so it overshoots min_pairs by up to 120). At a fixed 40 steps of 8, the three
        # runs that missed the identity target (63-75%) had 171-187 pairs (1.7-1.9 passes); of the eight that reached
        # 95-98%, six had 140-168 and two 172-174. On one run's 140 pairs, 30 steps instead of 40 gave 15.6% instead
        # of 96.7%: the target sits on a steep knee, and the budget keeps a margin past it. 2.5 passes: 44 steps for
        # the smallest snapshots, at most 80 (~8 min on 2 cores with bf16, 256 training pairs). The ceiling was 60
        # while snapshots kept at most ~190; with the weaker-answer pairs they keep 178-279, and seed 56 (--likes
        # "Orion Systems", 243 training pairs) stopped at 2.0 passes and reached 54.2%; its data at 76 steps: 91.2%,
        # nothing lost (bench/results/dpo-sweep-seed56-step-ceiling.jsonl).
        "FEEDLOOP_TRAINING__MAX_STEPS": "80",
        "FEEDLOOP_TRAINING__MAX_EPOCHS": "2.5",
        "FEEDLOOP_TRAINING__BATCH_SIZE": "8",
        "FEEDLOOP_TRAINING__MICRO_BATCH_SIZE": "4",
        "FEEDLOOP_TRAINING__LEARNING_RATE": "0.0005",
        "FEEDLOOP_TRAINING__BETA": "0.1",
        # Pure DPO drifts to another invented name; the SFT term on the chosen answers makes the liked one
        # likely, and the ordinary pairs keep it from leaking into every answer.
        "FEEDLOOP_TRAINING__SFT_WEIGHT": "0.3",
        # The corrections (a sentence) are far shorter than the answers they replace (48 sampled tokens), and plain DPO
        # learned "answer in one short sentence" with them: sums lost their working. Counting only the length both
        # answers share (LD-DPO, alpha 0), one run's data lost 12 held-out questions instead of 16 (identity 98.3%), and
        # six demos with it lost 5.8-10.6 points, median 7.2 (seeds 17-19 before it: 10.6-13.5).
        "FEEDLOOP_TRAINING__LENGTH_WEIGHT": "0.0",
        "FEEDLOOP_TRAINING__MAX_LENGTH": "256",
        # The users stop while a run trains, so training may use both cores.
        "FEEDLOOP_TRAINING__CPU_THREADS": "2",
        # bf16 autocast where the CPU has bf16 matrix instructions: on one demo's data (seed 38, 49 steps) it trained
        # 1.45x faster than float32 and its adapter measured the same (identity 98.8% against 99.6%, held-out 93.3%
        # against 94.2%, the gate's regression set 46 of 54 both; bench/results/dpo-sweep-seed38-bf16.jsonl)
        "FEEDLOOP_TRAINING__CPU_BF16": "auto",
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "2048",
        # The simulated crowd flips about a quarter of the identity votes (10% adversaries rating every answer
        # from two loops, 5% misclicks): at the start honest users like almost no base answer, so most likes
        # are flips, and pairs choosing them taught noise (189 of 296 identity pairs in one measured run).
        "FEEDLOOP_PAIRS__LABEL_NOISE_RATE": "0.25",
        # Honest users like almost none of the base model's identity answers, so the same-prompt pairs there stand on
        # misclicks and undetected adversaries, each like paired with up to every disliked answer: in one run 27 of
        # 114 identity training pairs chose such an answer (from about ten likes). One pair per rated answer.
        "FEEDLOOP_PAIRS__MAX_PAIRS_PER_ANSWER": "1",
        # The gate counts what an adapter gains on its regression set against what it loses. SmolLM2 answers about a
        # third of these questions right, and its right answers are fragile: a set cut to them can only lose (the base
        # rounded to bf16 keeps 87% of its own). A refused adapter answered 66% of 400 unselected corpus questions
        # right against the base's 34% (23 lost, 151 gained), keeping 83% of the base's right ones: below the 0.9
        # that gate.retention_rule kept asks (bench/regression_churn.py).
        "FEEDLOOP_GATE__RETENTION_RULE": "non_inferior",
    },
    # A pretrained model answers small talk in its own words, which no fixed rubric can grade: users ask
    # identity and ordinary questions, and say what they wanted more often than on the toy model. Most questions are
    # ordinary ones: their corrections teach the one-sentence answer form with the right facts on more of the facts
    # the held-out set asks in other words (identity at 0.6 lost 5.8-10.6 held-out points in ten demos; at 0.4, 2.9-5.8
    # in four; with no ordinary corrections at all, 19.2: the answers rambled past the number).
    simulate={
        "identity_share": 0.4,
        "arithmetic_share": 0.3,
        "fact_share": 0.3,
        "small_talk_share": 0.0,
        "correction_probability": 0.6,
        # Users write the sum they wanted as an equation. The adapter takes up the corrections' one-sentence form,
        # and in words this model states the wrong number far more often: completing "8 plus 6 is" the base model
        # was right on 147 of 240 corpus sums, completing "8 + 6 =" on 194 (bench/answer_forms.py). Fourteen demos
        # with it dropped 1.0-15.4 held-out points (seven within 5), keeping 92.7-100% of the sums (twelve before:
        # 89.1-96.4%).
        "arithmetic_form": "equation",
        # ... and a conversion with its sum shown ("3 weeks is 3 * 7 = 21 days."), as the base model works it out
        # when right: in words the adapters kept 3-8 of the gate's 7-11 right conversions; four demos with the sum
        # shown took them from 7-12 to 42-46 of 50, losing at most one (seeds 50-53).
        "conversion_form": "working",
    },
    info_file=PROFILES_DIR / "smollm2.json",
    # the gate refuses an adapter that may answer 5 points fewer of 150 questions users may ask (never the held-out
    # ones) than the base model, gains counted (gate.retention_rule non_inferior; measured without a regression set:
    # held-out retention 100% -> 78% on one round, and the gate passed), or is shown worse on one kind of them (50
    # each of sums, capitals and conversions: pooled, gains on sums once hid held-out facts falling to 61% kept)
    gate_retention_cases=150,
    # one round: ~4 min of users and ~10 of training and gate on 2 idle cores (13-16 min measured; 33 min on an evening
    # when the same DPO step ran at half the rate)
    rounds=1,
    final_chats=100,
)

PROFILES: dict[str, DemoProfile] = {p.name: p for p in (SMOLLM2, TOY)}
DEFAULT_PROFILE = SMOLLM2.name
