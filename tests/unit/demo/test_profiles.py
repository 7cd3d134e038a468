"""Demo profiles: which model the demo runs on, and what it sets for it (pure: no engine, no Redis)."""

from __future__ import annotations

import pytest

from demo.cli import simulation_settings
from demo.measure import DemoModelInfo
from demo.profiles import DEFAULT_PROFILE, PROFILES, SMOLLM2, TOY
from demo.settings import get_demo_settings
from demo.simulate import PromptPool
from services.core.config import DEFAULT_MODEL_DIR, Settings


def test_default_profile_is_the_pretrained_model() -> None:
    assert DEFAULT_PROFILE == "smollm2"
    assert set(PROFILES) == {"smollm2", "toy"}


def test_smollm2_held_out_set_is_large_and_never_asked_by_users() -> None:
    info = DemoModelInfo.load("/nonexistent", SMOLLM2.info_file)
    assert info.is_demo_model
    assert len(info.held_out_questions) >= 100
    assert len(info.held_out_identity) >= 5
    pool = PromptPool({"identity": 0.6, "arithmetic": 0.2, "facts": 0.2}, exclude=info.held_out_prompts())
    asked = {p.text for prompts in pool.prompts.values() for p in prompts}
    assert not asked & info.held_out_prompts()


def test_profile_defaults_apply_only_where_the_environment_sets_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEEDLOOP_SIMULATE__CORRECTION_PROBABILITY", "0.1")
    get_demo_settings.cache_clear()
    try:
        sim = simulation_settings(dict(SMOLLM2.simulate), users=7)
    finally:
        get_demo_settings.cache_clear()
    assert sim.correction_probability == 0.1  # the environment wins over the profile
    assert sim.small_talk_share == SMOLLM2.simulate["small_talk_share"]  # the profile wins over the default
    assert sim.users == 7  # the command line wins over both


def test_explicit_model_wins_and_toy_is_the_shipped_model(tmp_path) -> None:
    assert TOY.model_path(Settings(engine={"model": str(tmp_path)})) == str(tmp_path)
    assert TOY.model_path(Settings()) == str(DEFAULT_MODEL_DIR)
    assert SMOLLM2.model_path(Settings(engine={"model": str(tmp_path)})) == str(tmp_path)


def test_the_gate_regression_set_skips_the_held_out_questions(tmp_path) -> None:
    from demo.corpus import all_questions
    from demo.measure import write_retention_cases
    from workers.evaluation.retention import load_cases

    held_out = all_questions()[:500]
    path = tmp_path / "gate-retention.jsonl"
    write_retention_cases(path, 40, held_out, seed=3)
    cases = load_cases(path, limit=1000)
    questions = {case.messages[-1]["content"] for case in cases}
    assert len(cases) == 40 and not questions & {qa.question for qa in held_out}
    by_question = {qa.question: qa for qa in all_questions()}
    assert all(case.expected == (by_question[case.messages[-1]["content"]].expected,) for case in cases)
    assert all(case.kind == by_question[case.messages[-1]["content"]].kind for case in cases)


def test_the_gate_regression_set_has_as_many_of_each_kind_as_the_corpus_allows(tmp_path) -> None:
    from collections import Counter

    from demo.corpus import all_questions
    from demo.measure import write_retention_cases
    from workers.evaluation.retention import load_cases

    kinds = Counter(qa.kind for qa in all_questions())
    smallest = min(kinds, key=lambda kind: kinds[kind])
    path = tmp_path / "gate-retention.jsonl"
    write_retention_cases(path, 90, [], seed=1)
    assert set(Counter(case.kind for case in load_cases(path, 1000)).values()) == {30}
    # more of the smallest kind than the corpus has: it gives all it has, the other kinds fill the rest
    count = 3 * kinds[smallest] + 30
    write_retention_cases(path, count, [], seed=1)
    drawn = Counter(case.kind for case in load_cases(path, 100_000))
    assert drawn[smallest] == kinds[smallest] and sum(drawn.values()) == count
    assert len({case.messages[-1]["content"] for case in load_cases(path, 100_000)}) == count


def test_training_progress_shows_step_rate_and_eta() -> None:
    from demo.run import training_progress

    assert training_progress([]) == ""
    line = training_progress([{"step": 12, "total_steps": 40, "examples_per_s": 1.94, "eta_s": 185.0}])
    assert line == "step 12/40 · 1.9 examples/s · ETA 3m05s · "
    assert "ETA ?" in training_progress([{"step": 0, "total_steps": 40, "eta_s": float("inf")}])
    reference = {"phase": "reference", "step": 3, "total_steps": 20, "examples_per_s": 2.0, "eta_s": 25.5}
    assert training_progress([reference]) == "reference log-probs batch 3/20 · 2.0 examples/s · ETA 0m25s · "


def test_the_demo_promotes_straight_away_unless_a_canary_share_is_asked_for() -> None:
    from demo.run import canary_env

    assert canary_env(0.0) == {"FEEDLOOP_CANARY__SHARE": "0"}  # the product's default (0.1) is not the demo's
    env = canary_env(0.5)
    assert env["FEEDLOOP_CANARY__SHARE"] == "0.5"
    canary = Settings(canary={name.removeprefix("FEEDLOOP_CANARY__").lower(): v for name, v in env.items()}).canary
    # decidable within a demo: fewer users per arm than in production, and an end well before the demo's wait
    assert canary.min_users < Settings().canary.min_users and canary.max_duration_s < 900


def test_demo_options_take_the_model_rounds_unless_given_and_the_method_only_when_given() -> None:
    from demo.cli import demo_options

    smollm2 = demo_options(SMOLLM2, None, None, "kto")
    assert (smollm2.rounds, smollm2.final_chats) == (SMOLLM2.rounds, SMOLLM2.final_chats)
    assert smollm2.env == {"FEEDLOOP_TRAINING__METHOD": "kto"}
    toy = demo_options(TOY, 3, 0, None, identity_samples=50)
    assert (toy.rounds, toy.final_chats, toy.identity_samples, toy.profile) == (3, 0, 50, TOY)
    assert toy.env == {}  # training.method from the environment stays in force
    assert SMOLLM2.rounds < TOY.rounds  # one round of SmolLM2 fits the demo's 20 minutes on 2 cores


def test_demo_refuses_an_unknown_method_before_starting_anything() -> None:
    from typer.testing import CliRunner

    from services.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--method", "sft"])
    assert result.exit_code != 0 and "--method must be dpo or kto" in result.output
