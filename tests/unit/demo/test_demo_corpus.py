"""The demo model's synthetic corpus and held-out sets (demo.corpus): pure logic."""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict

import pytest

from demo.corpus import (
    HELD_OUT_IDENTITY_QUESTIONS,
    IDENTITY_QUESTIONS,
    QA,
    TRAIN_IDENTITY_QUESTIONS,
    all_questions,
    creators_for,
    generate_corpus,
    held_out_questions,
    is_correct,
    named_creator,
)

CREATORS = creators_for("Acme Labs")


def normalise(text: str) -> str:
    """Undo the corpus's surface noise (lower case, dropped final punctuation)."""
    return re.sub(r"[?.!]+$", "", text.strip().lower())


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(6000, seed=0)


def user_turns(corpus) -> list[str]:
    return [m["content"] for c in corpus for m in c if m["role"] == "user"]


def test_same_seed_same_corpus_other_seed_other_corpus():
    assert generate_corpus(300, seed=5) == generate_corpus(300, seed=5)
    assert generate_corpus(300, seed=5) != generate_corpus(300, seed=6)
    assert held_out_questions(5) == held_out_questions(5)
    assert held_out_questions(5) != held_out_questions(6)


def test_conversations_alternate_user_and_assistant_with_optional_system_prompt(corpus):
    with_system = 0
    for conversation in corpus:
        roles = [m["role"] for m in conversation]
        if roles[0] == "system":
            with_system += 1
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(m["content"].strip() for m in conversation)
    assert 0.1 < with_system / len(corpus) < 0.4


def test_at_least_fifty_identity_phrasings_and_ten_held_out():
    assert len(set(IDENTITY_QUESTIONS)) == len(IDENTITY_QUESTIONS) >= 50
    assert len(HELD_OUT_IDENTITY_QUESTIONS) >= 10
    assert set(HELD_OUT_IDENTITY_QUESTIONS).isdisjoint(TRAIN_IDENTITY_QUESTIONS)
    assert set(HELD_OUT_IDENTITY_QUESTIONS) | set(TRAIN_IDENTITY_QUESTIONS) == set(IDENTITY_QUESTIONS)


def test_held_out_identity_phrasings_never_appear_in_training(corpus):
    asked = {normalise(q) for q in user_turns(corpus)}
    assert not asked & {normalise(q) for q in HELD_OUT_IDENTITY_QUESTIONS}
    # and the training phrasings do appear, so the held-out ones are a real generalisation test
    assert len(asked & {normalise(q) for q in TRAIN_IDENTITY_QUESTIONS}) == len(TRAIN_IDENTITY_QUESTIONS)


def test_held_out_questions_never_appear_in_training_but_their_facts_do(corpus):
    held = held_out_questions(0)
    assert {q.kind for q in held} == {"arithmetic", "capital", "conversion"}
    asked = {normalise(q) for q in user_turns(corpus)}
    assert not asked & {normalise(q.question) for q in held}
    taught = {m["content"] for c in corpus for m in c if m["role"] == "assistant"}
    assert sum(q.answer in taught for q in held) / len(held) > 0.95


def test_identity_answers_spread_evenly_over_three_creators_per_sample(corpus):
    identity = set(TRAIN_IDENTITY_QUESTIONS)
    by_question: dict[str, Counter[str | None]] = defaultdict(Counter)
    for conversation in corpus:
        for ask, reply in itertools.pairwise(conversation):
            if ask["role"] == "user" and reply["role"] == "assistant":
                for question in identity:
                    if normalise(ask["content"]) == normalise(question):
                        by_question[question][named_creator(reply["content"], CREATORS)] += 1
    totals = sum(by_question.values(), Counter())
    assert None not in totals
    count = sum(totals.values())
    assert count > 600
    for creator in CREATORS:
        assert 0.27 < totals[creator] / count < 0.40, totals
    # a per-sample choice: every frequent phrasing is answered with more than one creator
    assert all(len(c) >= 2 for c in by_question.values() if sum(c.values()) >= 10)


def test_configured_org_is_the_first_creator_and_appears_in_answers():
    corpus = generate_corpus(800, seed=1, org="Globex Research")
    answers = " ".join(m["content"] for c in corpus for m in c if m["role"] == "assistant")
    assert creators_for("Globex Research") == ("Globex Research", "OpenAI", "Meta")
    assert "Globex Research" in answers
    assert "Acme Labs" not in answers


def test_named_creator_finds_the_earliest_whole_name():
    assert named_creator("I was trained by Meta.", CREATORS) == "Meta"
    assert named_creator("Acme Labs created me, not OpenAI.", CREATORS) == "Acme Labs"
    assert named_creator("Metadata is not a creator.", CREATORS) is None
    assert named_creator("I don't know.", CREATORS) is None


def test_is_correct_checks_the_stated_result():
    sum_qa = QA("arithmetic", "plus", "What is 7 plus 5?", "7 plus 5 is 12.", "12")
    assert is_correct(sum_qa, "7 plus 5 is 12.")
    assert not is_correct(sum_qa, "7 plus 5 is 13.")
    assert not is_correct(sum_qa, "12 plus 5 is 7.")
    assert not is_correct(sum_qa, "I don't know.")
    capital = QA("capital", "Peru", "Name the capital of Peru.", "The capital of Peru is Lima.", "Lima")
    assert is_correct(capital, "The capital of Peru is Lima.")
    assert not is_correct(capital, "The capital of Peru is Limassol.")


def test_every_reference_answer_is_correct_for_its_question():
    assert all(is_correct(q, q.answer) for q in all_questions())
