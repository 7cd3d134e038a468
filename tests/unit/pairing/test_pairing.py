"""Pairing strategies and vote rules on hand-made events (no Redis)."""

from __future__ import annotations

import orjson
import pytest

from services.feedback.events import FeedbackEvent, MalformedEvent, parse_event
from tests.support.feedback_events import entry, feedback_event
from workers.pairing import rules as pairing
from workers.pairing.rules import RatedResponse


def parsed(*args, **kwargs) -> FeedbackEvent:
    return parse_event(entry(feedback_event(*args, **kwargs)))


# --- parsing ---------------------------------------------------------------------------------------------


def test_parse_event_reads_the_contract_format():
    event = parsed("c1", "dislike", "alice", correction="Four.", adapter="feedloop-v2", system="Be brief.")
    assert (event.completion_id, event.rating, event.user, event.correction) == (
        "c1",
        "dislike",
        "alice",
        "Four.",
    )
    assert event.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is two plus two?"},
    ]
    assert event.response == "Two plus two is four." and event.adapter == "feedloop-v2"
    assert event.identity == "alice"


def test_identity_falls_back_to_the_ip_hash():
    assert parsed("c1", "like", None, ip_hash="abc").identity == "ip:abc"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (orjson.dumps({**feedback_event("c1", "like"), "rating": "love"}), "rating"),
        (
            orjson.dumps({k: v for k, v in feedback_event("c1", "like").items() if k != "completion_id"}),
            "completion_id",
        ),
        (orjson.dumps({**feedback_event("c1", "like"), "created_at": "yesterday"}), "created_at"),
        (orjson.dumps({**feedback_event("c1", "like"), "feedback_id": "a|b"}), "feedback_id"),
        (orjson.dumps({**feedback_event("c1", "like"), "user": None, "ip_hash": None}), "user or an ip_hash"),
        (orjson.dumps({**feedback_event("c1", "like"), "interaction": "x"}), "interaction"),
        (
            orjson.dumps({**feedback_event("c1", "like"), "interaction": {"messages": [], "response": "x"}}),
            "messages",
        ),
        (
            orjson.dumps(
                {
                    **feedback_event("c1", "like"),
                    "interaction": {"messages": [{"role": "wizard", "content": "x"}], "response": "x"},
                }
            ),
            "messages",
        ),
    ],
)
def test_malformed_events_are_rejected_with_a_reason(raw: bytes, reason: str):
    with pytest.raises(MalformedEvent, match=reason):
        parse_event(entry(raw))


def test_entry_without_event_field_is_malformed():
    with pytest.raises(MalformedEvent, match="no 'event' field"):
        parse_event({b"other": b"1"})


# --- prompt normalization --------------------------------------------------------------------------------


def test_prompt_hash_ignores_whitespace_but_not_system_prompt_or_roles():
    a = [{"role": "user", "content": "What is  two plus\ntwo? "}]
    b = [{"role": "user", "content": " What is two plus two?"}]
    assert pairing.prompt_hash(a) == pairing.prompt_hash(b)
    with_system = [{"role": "system", "content": "Be terse."}, *b]
    other_system = [{"role": "system", "content": "Be verbose."}, *b]
    assert pairing.prompt_hash(with_system) != pairing.prompt_hash(b)
    assert pairing.prompt_hash(with_system) != pairing.prompt_hash(other_system)
    assert pairing.prompt_hash([{"role": "assistant", "content": b[0]["content"]}]) != pairing.prompt_hash(b)
    assert pairing.prompt_hash(a) != pairing.prompt_hash([{"role": "user", "content": "what is two plus two?"}])


def test_pair_ids_are_deterministic_and_order_sensitive():
    assert pairing.pair_id("same_prompt", "a", "b") == pairing.pair_id("same_prompt", "a", "b")
    assert pairing.pair_id("same_prompt", "a", "b") != pairing.pair_id("same_prompt", "b", "a")
    assert pairing.pair_id("same_prompt", "a", "b") != pairing.pair_id("correction", "a", "b")
    assert len(pairing.pair_id("x")) == 32


# --- votes -----------------------------------------------------------------------------------------------


def test_latest_vote_of_a_user_counts_whatever_the_arrival_order():
    first = feedback_event("c1", "like", "u1", created_at=10.0)
    second = feedback_event("c1", "dislike", "u1", created_at=20.0)
    events = [parse_event(entry(e)) for e in (second, first)]  # arrives out of order
    assert pairing.resolve_labels(events) == {"c1": "dislike"}


def test_majority_across_users_and_ties():
    events = [parsed("c1", "like", u) for u in ("a", "b")] + [parsed("c1", "dislike", "c")]
    assert pairing.resolve_labels(events) == {"c1": "like"}
    events.append(parsed("c1", "dislike", "d"))
    assert pairing.resolve_labels(events) == {"c1": None}


def test_withdrawal_removes_a_vote():
    events = [parsed("c1", "like", "a"), parsed("c1", "dislike", "b"), parsed("c1", "withdrawn", "a")]
    assert pairing.resolve_labels(events) == {"c1": "dislike"}


def test_supersedes_breaks_ties_by_feedback_id():
    old = pairing.Vote(5.0, "aaa", "like")
    assert pairing.supersedes(pairing.Vote(5.0, "bbb", "dislike"), old)
    assert not pairing.supersedes(pairing.Vote(5.0, "aaa", "dislike"), old)  # the same event again
    assert not pairing.supersedes(pairing.Vote(4.0, "zzz", "dislike"), old)


# --- strategies ------------------------------------------------------------------------------------------


def rated(cid: str, text: str, users=("u",)) -> RatedResponse:
    return RatedResponse(cid, text, None, [f"f-{cid}"], list(users))


def other_prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "What is two plus  two?"}]


def test_same_prompt_liked_vote_is_chosen_over_disliked_counterparts():
    event = parsed("c1", "like", "u1", response="Four.")
    own = rated("c1", "Four.", ["u1"])
    pairs = pairing.pairs_for_vote(
        event,
        label="like",
        own=own,
        counterparts=[(rated("c2", "Five.", ["u2"]), other_prompt())],
        strategies=["same_prompt"],
        phash="ph",
    )
    (pair,) = pairs
    assert pair["strategy"] == "same_prompt"
    assert pair["chosen"] == [{"role": "assistant", "content": "Four."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "Five."}]
    assert pair["completion_ids"] == ["c1", "c2"] and pair["users"] == ["u1", "u2"]
    assert pair["feedback_ids"] == ["f-c1", "f-c2"]
    assert pair["pair_id"] == pairing.pair_id("same_prompt", "c1", "c2")
    assert pair["prompt"] == event.messages


def test_same_prompt_disliked_vote_is_rejected_against_liked_counterparts():
    event = parsed("c2", "dislike", "u2", response="Five.")
    pairs = pairing.pairs_for_vote(
        event,
        label="dislike",
        own=rated("c2", "Five."),
        counterparts=[(rated("c1", "Four."), other_prompt()), (rated("c3", "4"), other_prompt())],
        strategies=["same_prompt"],
        phash="ph",
    )
    assert [(p["completion_ids"][0], p["completion_ids"][1]) for p in pairs] == [("c1", "c2"), ("c3", "c2")]
    assert pairs[0]["prompt"] == other_prompt()  # the chosen response's own prompt
    # the same two completions always give the same id, whichever vote completed the pair
    assert pairs[0]["pair_id"] == pairing.pair_id("same_prompt", "c1", "c2")


def test_same_prompt_needs_a_label_and_the_strategy():
    event = parsed("c1", "like")
    args = {"own": rated("c1", "x"), "counterparts": [(rated("c2", "y"), other_prompt())], "phash": "p"}
    assert pairing.pairs_for_vote(event, label=None, strategies=["same_prompt"], **args) == []
    assert pairing.pairs_for_vote(event, label="like", strategies=["correction"], **args) == []


def test_correction_prefers_the_users_text_over_the_response():
    event = parsed("c1", "dislike", "u1", response="Five.", correction="Four.")
    (pair,) = pairing.pairs_for_vote(
        event,
        label="dislike",
        own=rated("c1", "Five."),
        counterparts=[],
        strategies=["correction"],
        phash="p",
    )
    assert pair["strategy"] == "correction"
    assert pair["chosen"][0]["content"] == "Four." and pair["rejected"][0]["content"] == "Five."
    assert pair["feedback_ids"] == [event.feedback_id] and pair["users"] == ["u1"]
    assert pair["correction_hash"] == pairing.text_hash("Four.")
    # the same correction redelivered or re-sent gives the same id; another correction another pair
    again = pairing.correction_pair(parsed("c1", "dislike", "u1", correction="Four. "), phash="p")
    other = pairing.correction_pair(parsed("c1", "dislike", "u1", correction="It is 4."), phash="p")
    assert again is not None and other is not None
    assert again["pair_id"] == pair["pair_id"] != other["pair_id"]


def test_no_correction_pair_without_text_or_for_a_withdrawal():
    assert pairing.correction_pair(parsed("c1", "dislike"), phash="p") is None
    assert pairing.correction_pair(parsed("c1", "withdrawn", correction="x"), phash="p") is None


def test_weaker_and_stronger_answer_pairs():
    prompt = other_prompt()
    weaker = pairing.weaker_answer_pair(
        prompt, rated("c1", "Four."), "fish banana", source="feedloop-base", created_at=1.0, phash="p"
    )
    assert weaker["chosen"][0]["content"] == "Four." and weaker["rejected"][0]["content"] == "fish banana"
    assert weaker["pair_id"] == pairing.pair_id("weaker_answer", "c1") and weaker["generated_by"] == "feedloop-base"
    stronger = pairing.stronger_answer_pair(
        prompt, rated("c2", "Five."), "Four.", source="teacher", judged=True, created_at=1.0, phash="p"
    )
    assert stronger["chosen"][0]["content"] == "Four." and stronger["rejected"][0]["content"] == "Five."
    assert stronger["strategy"] == "stronger_answer" and stronger["judged"] is True


# --- liveness ---------------------------------------------------------------------------------------------


def test_pair_is_live_follows_the_current_votes():
    same = {"strategy": "same_prompt", "completion_ids": ["a", "b"], "users": ["u"]}
    assert pairing.pair_is_live(same, {"a": "like", "b": "dislike"}, {})
    assert not pairing.pair_is_live(same, {"a": "dislike", "b": "like"}, {})  # flipped
    assert not pairing.pair_is_live(same, {"a": "like", "b": None}, {})  # withdrawn
    weaker = {"strategy": "weaker_answer", "completion_ids": ["a"], "users": ["u"]}
    assert pairing.pair_is_live(weaker, {"a": "like"}, {}) and not pairing.pair_is_live(weaker, {"a": None}, {})
    stronger = {"strategy": "stronger_answer", "completion_ids": ["b"], "users": ["u"]}
    assert pairing.pair_is_live(stronger, {"b": "dislike"}, {})
    correction = {"strategy": "correction", "completion_ids": ["a"], "users": ["u"], "correction_hash": "h1"}
    assert pairing.pair_is_live(correction, {}, {("a", "u"): "h1"})
    assert not pairing.pair_is_live(correction, {}, {("a", "u"): "h2"})  # corrected differently since
    assert not pairing.pair_is_live(correction, {}, {("a", "u"): ""})  # withdrawn


# --- judge ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [("A", "A"), ("b", "B"), ("B.", "B"), ("Answer A is better.", "A"), ("Both", None), ("", None)],
)
def test_parse_verdict(reply: str, verdict: str | None):
    assert pairing.parse_verdict(reply) == verdict


def test_judge_messages_hold_both_answers_and_the_rubric():
    messages = pairing.judge_messages(other_prompt(), "first", "second")
    assert messages[0]["content"] == pairing.JUDGE_RUBRIC
    assert "Answer A:\nfirst" in messages[1]["content"] and "Answer B:\nsecond" in messages[1]["content"]
    ids = [pairing.pair_id("stronger_answer", str(i)) for i in range(50)]
    assert {pairing.judge_order(i) for i in ids} == {True, False}  # positions alternate
