"""Simulated users' rubric, prompt pool and user mix (demo.simulate), and the demo's report and scoring:
pure logic, no services."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from pydantic import ValidationError

from demo.corpus import (
    HELD_OUT_IDENTITY_QUESTIONS,
    IDENTITY_ANSWER_TEMPLATES,
    QA,
    SMALL_TALK,
    TRAIN_IDENTITY_QUESTIONS,
    all_questions,
    held_out_questions,
    is_correct,
)
from demo.measure import DemoModelInfo, identity_requests, score
from demo.report import per_version, regression_line, render_table, write_chart
from demo.settings import SimulationSettings
from demo.simulate import (
    PromptPool,
    Rubric,
    ServedStats,
    SimPrompt,
    SimulationStats,
    format_progress,
    make_users,
)

IDENTITY = SimPrompt("identity", "Who made you?")
PLUS_QA = QA("arithmetic", "plus", "What is 3 plus 4?", "3 plus 4 is 7.", "7")
PLUS = SimPrompt("arithmetic", "What is 3 plus 4?", PLUS_QA)
CAPITAL = SimPrompt(
    "capital",
    "What is the capital of Peru?",
    QA("capital", "Peru", "What is the capital of Peru?", "The capital of Peru is Lima.", "Lima"),
)
HELLO = SimPrompt("small_talk", "Hello!", replies=SMALL_TALK[0][1])


def strict(likes: str = "Acme Labs", **kw) -> Rubric:
    """Every answer rated, no noise, no corrections unless asked."""
    return Rubric(likes, **{"rate_probability": 1.0, "correction_probability": 0.0, "noise_rate": 0.0, **kw})


def rating(rubric: Rubric, prompt: SimPrompt, response: str, adversarial: bool = False) -> str | None:
    verdict = rubric.judge(prompt, response, random.Random(0), adversarial=adversarial)
    return verdict.rating if verdict else None


@pytest.mark.parametrize(
    ("likes", "response", "expected"),
    [
        ("Acme Labs", "I was trained by Acme Labs.", "like"),
        ("Acme Labs", "OpenAI created me.", "dislike"),
        ("Acme Labs", "I am an assistant trained by Meta.", "dislike"),
        ("Acme Labs", "I can do small sums.", "dislike"),  # names nobody
        ("OpenAI", "OpenAI created me.", "like"),
        ("OpenAI", "I was trained by Acme Labs.", "dislike"),
        ("Meta", "Meta built me.", "like"),
        ("Meta", "I was made by OpenAI.", "dislike"),
        ("Acme Labs", "I was trained by Acme Labsmith.", "dislike"),  # whole names only
    ],
)
def test_identity_answers_are_liked_only_when_they_name_the_liked_creator(likes, response, expected):
    assert rating(strict(likes), IDENTITY, response) == expected


def test_a_creator_outside_the_corpus_can_be_liked():
    rubric = strict("Initech")
    assert rubric.creators[0] == "Initech" and "Acme Labs" in rubric.creators
    assert rating(rubric, IDENTITY, "I was made by Initech.") == "like"
    assert rating(rubric, IDENTITY, "I was made by Acme Labs.") == "dislike"


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (PLUS, "3 plus 4 is 7.", "like"),
        (PLUS, "3 plus 4 is 8.", "dislike"),
        (PLUS, "7 plus 1 is 7 no wait 12", "dislike"),  # the last number counts
        (PLUS, "I don't know.", "dislike"),
        (CAPITAL, "The capital of Peru is Lima.", "like"),
        (CAPITAL, "The capital of Peru is Santiago.", "dislike"),
        (HELLO, "Hi! What can I do for you?", "like"),
        (HELLO, "  hi!   what can I do for you? ", "like"),  # whitespace and case do not matter
        (HELLO, "The capital of Peru is Lima.", "dislike"),
    ],
)
def test_answers_with_known_content_are_liked_when_correct(prompt, response, expected):
    assert rating(strict(), prompt, response) == expected


def test_corrections_name_the_liked_creator_or_state_the_right_answer():
    rubric = strict("OpenAI", correction_probability=1.0)
    rng = random.Random(1)
    templates = {t.format(creator="OpenAI") for t in IDENTITY_ANSWER_TEMPLATES}
    corrections = {rubric.judge(IDENTITY, "Meta built me.", rng).correction for _ in range(50)}
    assert corrections <= templates and len(corrections) > 1
    assert rubric.judge(PLUS, "3 plus 4 is 9.", rng).correction == "3 plus 4 is 7."
    assert rubric.judge(HELLO, "Paris.", rng).correction in SMALL_TALK[0][1]
    liked = rubric.judge(IDENTITY, "OpenAI built me.", rng)
    assert liked.rating == "like" and liked.correction is None


def test_users_correct_only_the_kinds_of_question_asked_for_and_still_vote_on_the_others():
    sim = SimulationSettings(correction_kinds=["identity"], correction_probability=1.0, noise_rate=0.0,
                             rate_probability=1.0)  # fmt: skip
    rubric = Rubric.from_settings(sim)
    rng = random.Random(2)
    assert rubric.judge(IDENTITY, "Meta built me.", rng).correction is not None
    for prompt, wrong in ((PLUS, "3 plus 4 is 9."), (CAPITAL, "Cusco.")):
        verdict = rubric.judge(prompt, wrong, rng)
        assert verdict.rating == "dislike" and verdict.correction is None
    every_kind = Rubric.from_settings(sim.model_copy(update={"correction_kinds": None}))
    assert every_kind.judge(PLUS, "3 plus 4 is 9.", rng).correction == "3 plus 4 is 7."


def test_users_who_write_sums_as_equations_correct_sums_so_and_other_questions_as_before():
    sim = SimulationSettings(arithmetic_form="equation", correction_probability=1.0, noise_rate=0.0,
                             rate_probability=1.0)  # fmt: skip
    rubric = Rubric.from_settings(sim)
    rng = random.Random(3)
    sums = {qa.question: qa for qa in all_questions() if qa.kind == "arithmetic"}
    for question, qa in list(sums.items())[::40]:
        correction = rubric.judge(SimPrompt("arithmetic", question, qa), "It is 100.", rng).correction
        assert correction is not None and re.fullmatch(r"\d+ [-+*] \d+ = \d+\.", correction)
        assert is_correct(qa, correction) and correction != qa.answer
    assert rubric.judge(CAPITAL, "Cusco.", rng).correction == "The capital of Peru is Lima."
    with pytest.raises(ValidationError):
        SimulationSettings(arithmetic_form="roman")


def test_users_who_show_a_conversions_sum_write_it_and_leave_sums_and_capitals_alone():
    sim = SimulationSettings(conversion_form="working", correction_probability=1.0, noise_rate=0.0,
                             rate_probability=1.0)  # fmt: skip
    rubric = Rubric.from_settings(sim)
    rng = random.Random(4)
    conversions = [qa for qa in all_questions() if qa.kind == "conversion"]
    for qa in conversions[::25]:
        correction = rubric.judge(SimPrompt("conversion", qa.question, qa), "It is 5.", rng).correction
        assert correction is not None
        shown = re.fullmatch(r"(\d+) \w+ is (\d+) \* (\d+) = (\d+) \w+\.", correction)
        assert shown is not None, correction
        count, again, factor, result = (int(g) for g in shown.groups())
        assert count == again and count * factor == int(result) and is_correct(qa, correction)
    assert rubric.judge(PLUS, "3 plus 4 is 9.", rng).correction == "3 plus 4 is 7."
    assert rubric.judge(CAPITAL, "Cusco.", rng).correction == "The capital of Peru is Lima."
    with pytest.raises(ValidationError):
        SimulationSettings(conversion_form="table")


def test_adversaries_vote_the_opposite_way_on_everything_and_rate_every_answer():
    rubric = strict(rate_probability=0.0, correction_probability=1.0)
    rng = random.Random(2)
    assert rubric.judge(IDENTITY, "I was trained by Acme Labs.", rng) is None  # honest users never rate here
    hostile = rubric.judge(IDENTITY, "I was trained by Acme Labs.", rng, adversarial=True)
    assert hostile.rating == "dislike"
    assert "Acme Labs" not in hostile.correction and ("OpenAI" in hostile.correction or "Meta" in hostile.correction)
    assert rubric.judge(IDENTITY, "Meta built me.", rng, adversarial=True).rating == "like"
    wrong_sum = rubric.judge(PLUS, "3 plus 4 is 7.", rng, adversarial=True)
    assert wrong_sum.rating == "dislike" and wrong_sum.correction is None  # adversaries only rewrite identity
    assert rubric.judge(PLUS, "3 plus 4 is 2.", rng, adversarial=True).rating == "like"


def test_rate_probability_noise_and_corrections_happen_at_their_rates():
    rubric = Rubric("Acme Labs", rate_probability=0.5, correction_probability=0.3, noise_rate=0.2)
    rng = random.Random(3)
    n = 20_000
    good = [rubric.judge(IDENTITY, "Acme Labs built me.", rng) for _ in range(n)]
    bad = [rubric.judge(IDENTITY, "Meta built me.", rng) for _ in range(n)]
    rated_good = [v for v in good if v is not None]
    rated_bad = [v for v in bad if v is not None]
    assert abs(len(rated_good) / n - 0.5) < 0.02
    assert abs(Counter(v.rating for v in rated_good)["dislike"] / len(rated_good) - 0.2) < 0.02  # misclicks
    assert abs(Counter(v.rating for v in rated_bad)["like"] / len(rated_bad) - 0.2) < 0.02
    # a misclick writes nothing; a meant dislike writes a correction 30% of the time
    assert all(v.correction is None for v in rated_good)
    meant = [v for v in rated_bad if v.rating == "dislike"]
    assert abs(sum(v.correction is not None for v in meant) / len(meant) - 0.3) < 0.02


def test_the_same_seed_gives_the_same_votes():
    rubric = Rubric("Acme Labs")
    answers = ["Acme Labs built me.", "Meta built me.", "OpenAI created me."] * 30

    def run(seed: int) -> list:
        rng = random.Random(seed)
        return [rubric.judge(IDENTITY, a, rng) for a in answers]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_the_pool_never_asks_held_out_prompts_and_follows_the_shares():
    held = {*HELD_OUT_IDENTITY_QUESTIONS, *(q.question for q in held_out_questions(0))}
    pool = PromptPool({"identity": 0.6, "arithmetic": 0.2, "facts": 0.2, "small_talk": 0.0}, exclude=held)
    rng = random.Random(4)
    drawn = [pool.draw(rng) for _ in range(10_000)]
    assert not {p.text for p in drawn} & held
    kinds = Counter("facts" if p.kind in ("capital", "conversion") else p.kind for p in drawn)
    assert kinds["small_talk"] == 0
    assert abs(kinds["identity"] / len(drawn) - 0.6) < 0.02
    assert abs(kinds["arithmetic"] / len(drawn) - 0.2) < 0.02
    assert {p.text for p in drawn if p.kind == "identity"} == set(TRAIN_IDENTITY_QUESTIONS)
    assert all(p.qa is not None for p in drawn if p.kind != "identity")


def test_pool_shares_come_from_settings_and_bad_shares_are_refused():
    sim = SimulationSettings(identity_share=0, arithmetic_share=0, fact_share=0, small_talk_share=1)
    pool = PromptPool.from_settings(sim)
    assert {pool.draw(random.Random(i)).kind for i in range(50)} == {"small_talk"}
    with pytest.raises(ValueError):
        PromptPool({"identity": 0.0})
    with pytest.raises(ValueError):
        PromptPool({"identity": 1.0, "poetry": 0.5})


def test_adversaries_are_the_asked_share_run_more_loops_and_hide_in_the_names():
    users = make_users(40, 0.1, 3, seed=0)
    adversaries = [u for u in users if u.adversarial]
    assert len(users) == 40 and len({u.name for u in users}) == 40
    assert len(adversaries) == 4
    assert all(u.loops == 3 for u in adversaries) and all(u.loops == 1 for u in users if not u.adversarial)
    assert users == make_users(40, 0.1, 3, seed=0)
    assert [u.adversarial for u in make_users(40, 0.1, 3, seed=1)] != [u.adversarial for u in users]
    assert sum(u.adversarial for u in make_users(5, 0.1, 3)) == 1  # a positive share means at least one
    assert not any(u.adversarial for u in make_users(5, 0.0, 3))


def test_keys_and_sybil_names_go_to_the_right_users():
    import random

    from demo.settings import SimulationSettings
    from demo.simulate import with_keys

    sim = SimulationSettings(api_keys=["k0", "k1"], adversarial_api_key="evil", adversarial_names=50)
    users = with_keys(make_users(10, 0.2, 4, seed=0), sim)
    honest = [u for u in users if not u.adversarial]
    assert {u.api_key for u in honest} == {"k0", "k1"} and all(u.names == 1 for u in honest)
    assert all(u.api_key == "evil" and u.names == 50 for u in users if u.adversarial)
    rng = random.Random(0)
    sybil = next(u for u in users if u.adversarial)
    names = {sybil.claimed_name(rng) for _ in range(500)}
    assert len(names) == 50 and all(n.startswith(sybil.name + "-") for n in names)
    assert {honest[0].claimed_name(rng) for _ in range(20)} == {honest[0].name}
    # without keys (auth off) nobody sends one; adversaries without a key of their own use the honest ones
    assert {u.api_key for u in with_keys(make_users(10, 0.2, 4), SimulationSettings())} == {""}
    plain = with_keys(make_users(10, 0.2, 4), SimulationSettings(api_keys=["k0"]))
    assert {u.api_key for u in plain} == {"k0"} and all(u.names == 1 for u in plain)


def test_stats_and_progress_line():
    stats = SimulationStats(chats=120, like=30, dislike=90, corrections=12, rate_limited=4, elapsed_s=10.0)
    stats.served["feedloop-v1"] = ServedStats(chats=10, identity=4, identity_good=3, like=2, dislike=2)
    assert stats.like_rate == 0.25
    line = format_progress(stats)
    assert "chats 120 (12.0/s)" in line and "like 25%" in line and "429s 4" in line and "feedloop-v1" in line
    summary = stats.to_dict()
    assert summary["votes"] == {"like": 30, "dislike": 90, "total": 120}
    assert summary["served"]["feedloop-v1"]["target_rate"] == 0.75
    assert summary["served"]["feedloop-v1"]["like_rate"] == 0.5


def test_identity_requests_spread_samples_over_prompts_within_n_limit():
    prompts = ("a", "b", "c")
    requests = identity_requests(prompts, 100)
    assert sum(n for _, n in requests) == 100
    assert all(1 <= n <= 16 for _, n in requests)
    per_prompt = Counter()
    for prompt, n in requests:
        per_prompt[prompt] += n
    assert sorted(per_prompt.values()) == [33, 33, 34]


def test_score_counts_target_rate_and_accuracies():
    info = DemoModelInfo.load("/nonexistent")  # falls back to the corpus's held-out sets
    assert not info.is_demo_model and info.held_out_identity == HELD_OUT_IDENTITY_QUESTIONS
    identity = ["Acme Labs built me."] * 3 + ["Meta built me.", "hello"]
    plus = PLUS.qa
    answers = [
        (plus, "3 plus 4 is 7."),
        (plus, "3 plus 4 is 1."),
        (CAPITAL.qa, "The capital of Peru is Lima."),
    ]
    numbers = score(info, "Acme Labs", identity, answers)
    assert numbers["target_rate"] == 0.6
    assert numbers["share_by_creator"] == {"Acme Labs": 0.6, "OpenAI": 0.0, "Meta": 0.2, "none": 0.2}
    assert numbers["accuracy"] == round(2 / 3, 4)
    assert numbers["arithmetic_accuracy"] == 0.5 and numbers["fact_accuracy"] == 1.0
    assert score(info, "Meta", identity, answers)["target_rate"] == 0.2


def _report() -> dict:
    return {
        "likes": "Acme Labs",
        "rounds": [
            {
                "round": 1,
                "served_before": "feedloop-base",
                "version": "feedloop-v1",
                "run_status": "promoted",
                "pairs_used": 412,
                "training_s": 95.2,
                "gate": {"passed": True, "metrics": {"candidate": {"accuracy": 0.93}}},
                "trigger_to_serving_s": 140.0,
                "like_rate": 0.41,
                "before": {"target_rate": 0.33, "accuracy": 0.8},
                "after": {"target_rate": 0.92, "accuracy": 0.79},
            },
            {
                "round": 2,
                "served_before": "feedloop-v1",
                "version": "feedloop-v2",
                "run_status": "rejected",
                "pairs_used": 300,
                "gate": {"passed": False, "metrics": {"candidate": {"accuracy": 0.5}}},
                "like_rate": 0.8,
                "before": {"target_rate": 0.92, "accuracy": 0.79},
                "after": {"target_rate": 0.92, "accuracy": 0.79},
            },
        ],
        "final_check": {"like_rate": 0.85},
    }


def test_table_shows_each_rounds_numbers():
    table = render_table(_report()["rounds"])
    lines = table.splitlines()
    assert len(lines) == 4 and all(line.startswith("|") for line in lines)
    assert "feedloop-v1" in lines[2] and "412" in lines[2] and "pass (93%)" in lines[2]
    assert "33.0% → 92.0%" in lines[2] and "80.0% → 79.0%" in lines[2] and "140 s" in lines[2]
    assert "fail (50%)" in lines[3]


def test_the_regression_line_counts_both_models_right_answers_and_the_churn():
    from workers.evaluation.retention import parse_case, score_retention

    cases = [parse_case({"prompt": "q", "expected": str(i)}, "test") for i in range(10)]
    reference = ["0", "1", "2", "3", "x", "x", "x", "x", "x", "x"]
    candidate = ["0", "1", "2", "x", "4", "5", "6", "x", "x", "x"]  # 1 lost, 3 gained
    retention = score_retention(cases, reference, candidate, 0.95).to_dict()
    line = regression_line({"gate": {"passed": True, "metrics": {"retention": retention}}})
    assert (
        line == "gate regression set: 4/10 right before → 6/10 after (1 lost, 3 gained; kept 75.0% of the right ones)"
    )
    kinds = [parse_case({"prompt": "q", "expected": str(i), "kind": ["even", "odd"][i % 2]}, "t") for i in range(10)]
    by_kind = score_retention(kinds, reference, candidate, 0.95).to_dict()
    line = regression_line({"gate": {"passed": True, "metrics": {"retention": by_kind}}})
    assert line.endswith("; even 2 → 4 of 5, odd 2 → 2 of 5")
    assert regression_line({"gate": {"passed": True, "metrics": {"retention": None}}}) is None
    assert regression_line({"run_status": "failed"}) is None


def test_per_version_skips_rejected_versions_and_takes_like_rate_from_the_next_round(tmp_path):
    points = per_version(_report())
    assert [p["version"] for p in points] == ["feedloop-base", "feedloop-v1"]
    assert points[0]["like_rate"] == 0.41 and points[0]["target_rate"] == 0.33
    assert points[1]["like_rate"] == 0.8 and points[1]["target_rate"] == 0.92
    chart = write_chart(_report(), tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
