"""The answer-consensus rule (workers/pairing/consensus.py): pure logic."""

from __future__ import annotations

import math

import pytest

from workers.pairing.consensus import (
    PromptGroupAnswers,
    RatedAnswer,
    apply_consensus,
    group_answers,
    without_voters,
)


def pair(pid: str, strategy: str, *cids: str, phash: str = "p") -> dict:
    return {"pair_id": pid, "strategy": strategy, "completion_ids": list(cids), "prompt_hash": phash}


def group(*answers: tuple[str, str, str], similarity: float = 1.0) -> PromptGroupAnswers:
    return PromptGroupAnswers([RatedAnswer(cid, text, label) for cid, text, label in answers], similarity)


BASE = group(
    ("liked-once", "I was made by Acme.", "like"),
    ("d1", "I was made by Acme.", "dislike"),
    ("d2", "i was  made by acme.", "dislike"),
    ("new", "Globex trained me.", "like"),
    ("bad", "Globex trained me!", "dislike"),
    ("tie-like", "Hello.", "like"),
    ("tie-dislike", "hello.", "dislike"),
)


def test_a_like_outvoted_on_the_same_answer_drops_its_weaker_answer_pair() -> None:
    pairs = [
        pair("w-bad", "weaker_answer", "liked-once"),
        pair("w-new", "weaker_answer", "new"),  # an answer no one else rated: kept
        pair("w-tie", "weaker_answer", "tie-like"),  # a tie does not contradict
    ]
    result = apply_consensus(pairs, {"p": BASE})
    assert [p["pair_id"] for p in result.kept] == ["w-new", "w-tie"]
    assert result.dropped == {("consensus", "contradicted"): 1}
    assert result.dropped_ids == {"w-bad": ("consensus", "contradicted")}


def test_each_side_is_checked_against_its_own_label() -> None:
    liked_twice = group(("a", "Yes.", "like"), ("b", "yes.", "like"), ("c", "YES.", "dislike"), ("n", "No.", "dislike"))
    pairs = [
        pair("s-ok", "same_prompt", "a", "n"),
        pair("s-rejected-side", "same_prompt", "a", "c"),  # c disliked, but its answer is liked 2:1
        pair("stronger", "stronger_answer", "c"),
        pair("correction", "correction", "c"),  # a user's own text: exempt
    ]
    kept = apply_consensus(pairs, {"p": liked_twice}).kept
    assert [p["pair_id"] for p in kept] == ["s-ok", "correction"]


def test_other_prompts_and_unlabelled_completions_are_left_to_the_other_checks() -> None:
    pairs = [pair("elsewhere", "weaker_answer", "liked-once", phash="other"), pair("gone", "weaker_answer", "zz")]
    assert len(apply_consensus(pairs, {"p": BASE}).kept) == 2


def test_similarity_below_one_groups_near_identical_answers() -> None:
    long_answer = "The capital of Japan is Tokyo, a city of about fourteen million people on Honshu."
    answers = [("x", long_answer, "like"), ("y", long_answer.replace("fourteen", "fourteen-odd"), "dislike")]
    answers.append(("z", long_answer.replace("Honshu", "the island of Honshu"), "dislike"))
    assert group(*answers).tally(long_answer) == {"like": 1}
    assert group(*answers, similarity=0.7).tally(long_answer) == {"like": 1, "dislike": 2}


def test_group_answers_reads_labels_and_records() -> None:
    records = {"a": {"response": "Yes."}, "b": {"response": "yes."}}
    built = group_answers({"a": "like", "b": "dislike", "missing": "like"}, records, 1.0)
    assert sorted(a.completion_id for a in built.answers) == ["a", "b"]
    assert built.tally("YES.") == {"like": 1, "dislike": 1}


def crowd(likes: int, dislikes: int) -> PromptGroupAnswers:
    answers = [(f"l{i}", f"liked answer {i}", "like") for i in range(likes)]
    answers += [(f"d{i}", f"disliked answer {i}", "dislike") for i in range(dislikes)]
    return group(*answers)


@pytest.mark.parametrize(
    ("likes", "dislikes", "noise", "like_trusted", "dislike_trusted"),
    [
        (2, 10, 0.2, False, True),  # a like rate about the noise rate: the likes are flips
        (5, 7, 0.2, True, True),
        (10, 2, 0.2, True, False),  # and the mirror image for dislikes
        (2, 10, 0.1, True, True),  # less noise assumed: a 2-in-12 like rate is believed
        (0, 12, 0.0, True, True),  # 0 trusts everything
    ],
)
def test_labels_are_trusted_only_where_the_group_rate_beats_the_noise(
    likes: int, dislikes: int, noise: float, like_trusted: bool, dislike_trusted: bool
) -> None:
    answers = crowd(likes, dislikes)
    assert answers.trusts("like", noise) is like_trusted
    assert answers.trusts("dislike", noise) is dislike_trusted


def test_pairs_standing_on_an_untrusted_like_are_dropped_as_noisy() -> None:
    noisy, healthy = crowd(2, 10), crowd(6, 6)
    pairs = [
        pair("a", "same_prompt", "l0", "d0", phash="noisy"),
        pair("b", "weaker_answer", "l1", phash="noisy"),
        pair("c", "stronger_answer", "d1", phash="noisy"),  # its dislike is trusted
        pair("d", "correction", "d2", phash="noisy"),
        pair("e", "same_prompt", "l0", "d0", phash="healthy"),
    ]
    result = apply_consensus(pairs, {"noisy": noisy, "healthy": healthy}, noise_rate=0.2)
    assert [p["pair_id"] for p in result.kept] == ["c", "d", "e"]
    assert result.dropped == {("consensus", "noisy_group"): 2}


def test_a_vote_is_weighed_against_the_same_answer_directly_and_the_prompts_other_answers_weakly() -> None:
    from workers.pairing.consensus import ANSWER_PRIOR_VOTES, PROMPT_PRIOR_VOTES, vote_log_odds, voter_evidence

    # every answer differs: each vote is compared with the other votes on the prompt
    identity = [("honest-1", "dislike", "a"), ("honest-2", "dislike", "b"), ("honest-3", "dislike", "c"),
                ("contrarian", "like", "d")]  # fmt: skip
    facts = [("honest-1", "like", "e"), ("honest-2", "like", "f"), ("honest-3", "like", "e"),
             ("contrarian", "dislike", "e")]  # fmt: skip
    sparse = [("honest-1", "like", "i"), ("honest-2", "dislike", "j")]  # one other vote on the prompt: nothing
    evidence = voter_evidence([identity, facts, sparse])
    contrarian = evidence["contrarian"]
    assert contrarian.votes == 2
    # its like against the prompt's 3 other dislikes; its dislike of "e" against the 2 likes of "e"
    assert contrarian.log_odds == pytest.approx(
        vote_log_odds("like", 0, 3, PROMPT_PRIOR_VOTES) + vote_log_odds("dislike", 2, 2, ANSWER_PRIOR_VOTES)
    )
    assert vote_log_odds("dislike", 2, 2, ANSWER_PRIOR_VOTES) == pytest.approx(math.log(3))  # 3:1 after smoothing
    assert vote_log_odds("like", 0, 3, PROMPT_PRIOR_VOTES) == pytest.approx(math.log(7 / 4))  # weak
    honest = evidence["honest-1"]
    assert honest.votes == 1  # on "e" its others are one like and one dislike: that vote says nothing
    assert honest.log_odds < 0 < contrarian.log_odds
    assert evidence["honest-2"].votes == 2  # "f" has no other vote: the prompt's three others


def test_votes_on_the_same_answer_outweigh_the_prompt_as_a_whole() -> None:
    from workers.pairing.consensus import voter_evidence

    # a prompt with a right and a wrong answer, each rated by three users: the prompt's like rate is one half,
    # the answer's own votes say who agrees
    votes = [(u, "like", "Four.") for u in ("h1", "h2", "h3")] + [(u, "dislike", "Five.") for u in ("h1", "h2", "h3")]
    votes += [("adv", "dislike", "four. "), ("adv", "like", "Five.")]
    evidence = voter_evidence([votes])
    assert evidence["adv"].votes == 2
    assert evidence["adv"].log_odds == pytest.approx(2 * math.log(3))  # 3 of 3 others: 4:1 smoothed, capped at 3:1
    assert evidence["h1"].votes == 2 and evidence["h1"].log_odds < 0  # 2 of its 3 others agree


def test_honest_likes_on_a_split_prompt_are_weak_evidence_and_contrarian_votes_on_clear_ones_strong() -> None:
    """While a behaviour changes, a prompt's answers are mixed (here 4 of 10 liked). An honest user who liked
    four good answers there went against the majority four times; a share-of-agreement rule called them
    unreliable (1 of 5 agreeing). Weighed, they are not; a user going against others on the same answers is."""
    from workers.pairing.consensus import unreliable_voters, voter_evidence

    split = [(f"crowd-{i}", "like" if i < 4 else "dislike", f"answer {i}") for i in range(10)]
    split += [("enthusiast", "like", f"good answer {i}") for i in range(4)] + [("enthusiast", "dislike", "bad")]
    clear = [(f"crowd-{i}", "like", f"right {i}") for i in range(9)] + [("crowd-9", "dislike", "wrong")]
    clear += [("contrarian", "dislike", f"right {i}") for i in range(4)]
    groups = [split, clear]
    evidence = voter_evidence(groups)
    assert evidence["enthusiast"].votes == 5
    assert unreliable_voters(evidence, 9.0) == {"contrarian"}
    assert evidence["enthusiast"].log_odds < math.log(9.0) <= evidence["contrarian"].log_odds
    assert unreliable_voters(evidence, 0.0) == frozenset()


def test_a_prompt_s_few_other_votes_are_read_against_the_crowd_s_like_rate_of_the_same_served_model() -> None:
    """Where the crowd likes a fifth of a model's answers, a like beside two dislikes on a prompt is a like against
    the crowd; towards one half it would weigh 3:2, and four such likes stayed under the odds of 9. The crowd's rate
    is the rate of the same served model: where users like most of an adapter's answers, the same votes say little."""
    from workers.pairing.consensus import PROMPT_PRIOR_VOTES, unreliable_voters, vote_log_odds, voter_evidence

    def votes(model: str, crowd_likes: int) -> list[list[tuple[str, str, str, str]]]:
        background = [
            [(f"crowd-{i}", "like" if i < crowd_likes else "dislike", f"{model} answer {i}", model)] for i in range(10)
        ]
        prompts = [
            [("crowd-0", "dislike", f"p{k} a", model), ("crowd-5", "dislike", f"p{k} b", model),
             ("judged", "like", f"p{k} c", model)]
            for k in range(4)
        ]  # fmt: skip
        return background + prompts

    base = voter_evidence(votes("", crowd_likes=2))["judged"]
    assert base.votes == 4
    assert base.log_odds == pytest.approx(
        4 * vote_log_odds("like", 0, 2, PROMPT_PRIOR_VOTES, center=2.2 / 12)
    )  # at the 3:1 cap
    assert base.log_odds >= math.log(9.0) > 4 * vote_log_odds("like", 0, 2, PROMPT_PRIOR_VOTES)  # towards 1/2
    assert unreliable_voters(voter_evidence(votes("", crowd_likes=2)), 9.0) == {"judged"}
    before = voter_evidence(votes("", crowd_likes=2), center_on_crowd=False)["judged"]  # the rule before, measured
    assert before.log_odds == pytest.approx(4 * vote_log_odds("like", 0, 2, PROMPT_PRIOR_VOTES))
    liked = votes("adapter-v2", crowd_likes=10)  # the others like most of this model's answers (0.78 smoothed)
    assert voter_evidence(liked)["judged"].log_odds < 0
    # ... and it is the two who disliked those four answers that go against it, each vote against one like and one
    # dislike of others (a tie the rule before read as saying nothing)
    assert unreliable_voters(voter_evidence(liked), 9.0) == {"crowd-0", "crowd-5"}
    # both models' votes at once: each vote on a base answer is still read against the base's crowd
    both = voter_evidence(votes("", crowd_likes=2) + liked[:10])["judged"]
    assert both.log_odds == pytest.approx(base.log_odds)


def test_a_crowd_that_rated_every_answer_one_way_leaves_the_other_way_possible() -> None:
    """A crowd that disliked (or liked) every answer so far is smoothed like any other: a vote the other way is
    strong evidence, not an impossible one, and nothing divides by zero."""
    from workers.pairing.consensus import MAX_VOTE_LOG_ODDS, voter_evidence

    for rating, other in (("dislike", "like"), ("like", "dislike")):
        groups = [
            [(f"crowd-{i}", rating, f"{k} {i}") for i in range(3)] + [("judged", other, f"{k} x")] for k in range(4)
        ]
        evidence = voter_evidence(groups)["judged"]
        assert (evidence.votes, evidence.log_odds) == (4, pytest.approx(4 * MAX_VOTE_LOG_ODDS))
        assert voter_evidence(groups)["crowd-0"].log_odds < 0


def test_no_single_vote_decides_and_a_heavy_voter_counts_once_among_the_others() -> None:
    from workers.pairing.consensus import MAX_VOTE_LOG_ODDS, unreliable_voters, vote_log_odds, voter_evidence

    # a misclick against an answer ten others liked weighs 3:1, not 11:1
    assert vote_log_odds("dislike", 10, 10) == pytest.approx(MAX_VOTE_LOG_ODDS) == pytest.approx(math.log(3))
    assert vote_log_odds("like", 10, 10) == pytest.approx(-math.log(3))
    unanimous = [(f"crowd-{i}", "like", "Paris.") for i in range(10)] + [("clumsy", "dislike", "Paris.")]
    split = [("clumsy", "like", "Lyon."), ("a", "like", "Nice."), ("b", "dislike", "Metz.")]  # a 1:1 tie
    evidence = voter_evidence([unanimous, split, [("clumsy", "like", "x"), ("c", "like", "y"), ("d", "dislike", "z")]])
    # against evenly split others on a prompt, a vote is weighed by the crowd's like rate: these others liked most
    # answers (10 of 12 voters like all theirs), so the two likes agree with them and outweigh the misclick
    assert evidence["clumsy"].votes == 3 and evidence["clumsy"].log_odds < 0
    assert unreliable_voters(evidence, 9.0) == frozenset()

    # one voter liking "Rome." from four loops is one other voter, as the honest one disliking it is
    votes = [("loud", "like", "Rome.")] * 4 + [("quiet", "dislike", "Rome."), ("judged", "dislike", "Rome.")]
    evidence = voter_evidence([votes])
    assert "judged" not in evidence  # its others: one like, one dislike (counted per vote, 4 likes to 1)
    assert evidence["loud"].votes == 4  # its own votes each count, against the two dislikes
    assert evidence["loud"].log_odds == pytest.approx(4 * math.log(3))


def test_pairs_of_voters_who_mostly_go_against_the_crowd_are_dropped_corrections_too() -> None:
    from workers.pairing.consensus import VoterEvidence, unreliable_voters

    evidence = {
        "adversary": VoterEvidence(12, 6.0),
        "honest": VoterEvidence(12, -4.0),
        "new": VoterEvidence(0, 0.0),
        "two-votes": VoterEvidence(2, 4.4),  # fewer than 3 informative votes: not judged
        "three": VoterEvidence(3, 2.2),
    }
    unreliable = unreliable_voters(evidence, 9.0)  # log 9 = 2.197
    assert unreliable == {"adversary", "three"}
    assert unreliable_voters(evidence, 0.0) == frozenset()
    pairs = [
        {**pair("by-adversary", "correction", "c1"), "users": ["adversary"]},
        {**pair("mixed", "same_prompt", "new", "bad"), "users": ["honest", "adversary"]},
        {**pair("honest", "weaker_answer", "new"), "users": ["honest"]},
    ]
    result = apply_consensus(pairs, {"p": BASE}, unreliable=unreliable)
    assert [p["pair_id"] for p in result.kept] == ["honest"]
    assert result.dropped == {("consensus", "unreliable_voter"): 2}


def test_voter_flip_odds_is_off_or_at_least_one() -> None:
    from pydantic import ValidationError

    from services.core.config import PairsSettings

    assert PairsSettings(voter_flip_odds=0).voter_flip_odds == 0
    assert PairsSettings(voter_flip_odds=1).voter_flip_odds == 1
    with pytest.raises(ValidationError, match="at least 1"):
        PairsSettings(voter_flip_odds=0.5)


def test_without_voters_relabels_what_the_left_out_voters_voted_on_from_the_other_votes() -> None:
    labels = {"only-adv": "like", "outvoted": "like", "split": "dislike", "untouched": "like", "honest": "dislike"}
    votes = {
        "only-adv": [("adv", "like")],
        "outvoted": [("adv", "like"), ("adv2", "like"), ("h1", "dislike")],
        "split": [("adv", "dislike"), ("h1", "like"), ("h2", "dislike")],
        "untouched": [("h1", "like")],
        "honest": [("adv", "like"), ("h1", "dislike"), ("h2", "dislike")],
    }
    assert without_voters(labels, votes, frozenset({"adv", "adv2"})) == {
        "outvoted": "dislike",
        "untouched": "like",
        "honest": "dislike",
    }
    assert without_voters(labels, votes, frozenset()) == labels
    group = PromptGroupAnswers(
        [RatedAnswer(c, c, label) for c, label in without_voters(labels, votes, frozenset({"adv", "adv2"})).items()],
        1.0,
    )
    assert (group.likes, group.dislikes) == (1, 2)


def test_adversaries_who_vouch_for_each_other_are_found_once_the_clearest_is_left_out() -> None:
    """The second adversary likes only bad answers the first one liked too, each also disliked by an honest user:
    against those two others its likes say nothing. Judged again without the first one's votes, they do."""
    from workers.pairing.consensus import peel_unreliable_voters, unreliable_voters, voter_evidence

    crowd = [(f"crowd-{i}", "like", f"right {j}") for i in range(5) for j in range(4)]
    clear = crowd + [("first", "dislike", f"right {j}") for j in range(4)]
    shared = [
        [
            ("first", "like", f"bad {k}"),
            ("second", "like", f"bad {k}"),
            (f"honest-{k}", "dislike", f"bad {k}"),
            (f"honest-{k}", "like", f"good {k}"),
            (f"crowd-{k}", "like", f"good {k}"),
        ]
        for k in range(4)
    ]
    groups = [clear, *shared]
    assert unreliable_voters(voter_evidence(groups), 9.0) == {"first"}
    assert peel_unreliable_voters(groups, 9.0) == {"first", "second"}
    assert peel_unreliable_voters(groups, 0.0) == frozenset()
    honest_only = [clear[: len(crowd)], *[[vote for vote in g if vote[0] not in ("first", "second")] for g in shared]]
    assert peel_unreliable_voters(honest_only, 9.0) == frozenset()
