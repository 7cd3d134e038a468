"""The canary's sequential decision rule (workers/evaluation/canary_rule.py) on hand-made and simulated tallies."""

from __future__ import annotations

import json
import math
import random

import pytest

from workers.evaluation import canary_rule as cr

RULE = cr.CanaryRule(min_votes=30, min_users=10, max_duration_s=3600)


def users(count: int, likes: int, dislikes: int) -> list[cr.Tally]:
    return [(likes, dislikes)] * count


def test_each_user_counts_once() -> None:
    stats = cr.arm_stats({"heavy": (100, 0), "a": (0, 1), "b": (0, 1), "silent": (0, 0)})
    assert (stats.users, stats.votes, stats.likes) == (3, 102, 100)
    assert stats.like_rate == pytest.approx(1 / 3)  # per user: the heavy voter is one user of three
    assert stats.vote_like_rate == pytest.approx(100 / 102)  # per vote it would be ~98%
    assert stats.share_variance == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        cr.arm_stats([(-1, 2)])


def test_one_heavy_voter_cannot_decide_a_rollout() -> None:
    # The canary's users dislike it; one user likes it 1,000 times. Per vote the canary would look far
    # better than active (0.93 vs 0.67); per user it is far worse, and that is what the rule decides on.
    canary = [*users(40, 0, 2), (1000, 0)]
    active = users(200, 2, 1)
    decision = cr.decide(canary, active, elapsed_s=600, rule=RULE)
    assert decision.canary.vote_like_rate > 0.9 > decision.active.vote_like_rate
    assert decision.outcome == cr.ROLLBACK, decision.reason
    assert decision.upper < 0 and decision.difference == pytest.approx(1 / 41 - 2 / 3)


def test_waits_for_the_minimum_votes_and_users_then_times_out_conservatively() -> None:
    few_users = users(5, 20, 0)  # 100 votes, but only 5 users
    decision = cr.decide(few_users, users(100, 1, 1), elapsed_s=60, rule=RULE)
    assert decision.outcome == cr.CONTINUE and "canary has 100 votes from 5 users" in decision.reason
    assert math.isnan(decision.lower) and decision.to_dict()["lower"] is None
    few_votes = users(12, 1, 1)  # 12 users, 24 votes
    assert cr.decide(users(50, 1, 0), few_votes, 60, RULE).outcome == cr.CONTINUE
    timed_out = cr.decide(few_users, users(100, 1, 1), elapsed_s=3600, rule=RULE)
    assert timed_out.outcome == cr.KEEP_ACTIVE and timed_out.reason.startswith("timeout")
    # Enough data, but undecided at the deadline: keep the active adapter.
    close = cr.decide(users(15, 2, 1), [*users(10, 2, 1), *users(5, 1, 2)], elapsed_s=3600, rule=RULE)
    assert close.outcome == cr.KEEP_ACTIVE and close.lower < -RULE.margin < 0 < close.upper


def test_clearly_better_is_promoted_and_clearly_worse_rolled_back() -> None:
    active = [*users(60, 2, 1), *users(40, 1, 2)]  # per-user like-rate 0.53
    better = cr.decide([*users(45, 3, 0), *users(5, 1, 2)], active, 900, RULE)
    worse = cr.decide([*users(5, 3, 0), *users(45, 0, 2)], active, 900, RULE)
    assert better.outcome == cr.PROMOTE and better.lower > -RULE.margin, better.reason
    assert worse.outcome == cr.ROLLBACK and worse.upper < 0, worse.reason
    for decision in (better, worse):
        assert decision.lower < decision.difference < decision.upper
        assert decision.variance > 0
        payload = json.loads(json.dumps(decision.to_dict()))  # stored in the registry and the log as JSON
        assert payload["outcome"] == decision.outcome and payload["canary"]["users"] == 50
        assert payload["rule"]["margin"] == RULE.margin


def test_agreeing_users_do_not_collapse_the_interval() -> None:
    # Every user likes everything: the sample variance is 0, but ten users are still only ten users.
    decision = cr.decide(users(10, 3, 0), users(10, 3, 0), 600, RULE)
    assert decision.canary.share_variance == 0
    # shrunk towards p(1-p) with p clipped to 0.95: 4 pseudo-users against 9 degrees of freedom, per arm
    assert decision.variance == pytest.approx(2 * (4 * 0.95 * 0.05 / 13) / 10)
    assert decision.upper - decision.lower > 0.2


def test_the_always_valid_interval_is_wider_than_a_fixed_horizon_one() -> None:
    for variance in (1e-2, 1e-3, 1e-4, 1e-5):
        fixed = 1.645 * math.sqrt(variance)
        assert cr.halfwidth(variance, 0.05, 0.05) > fixed
        assert cr.halfwidth(variance, 0.05, 0.01) > cr.halfwidth(variance, 0.05, 0.05)
    # ... and still shrinks to 0 as the data grows.
    assert cr.halfwidth(1e-7, 0.05, 0.05) < 0.01
    with pytest.raises(ValueError):
        cr.CanaryRule(alpha=0.7)


def simulate(difference: float, rule: cr.CanaryRule, fixed_z: float | None, seed: int) -> str:
    """One canary: each check, new users arrive on both arms (1-4 votes each, users differ in taste)."""
    rng = random.Random(seed)
    arms: dict[str, list[cr.Tally]] = {"canary": [], "active": []}
    for check in range(1, 31):
        for arm, count, rate in (("canary", 5, 0.6 + difference), ("active", 20, 0.6)):
            for _ in range(count):
                taste = min(max(rng.gauss(rate, 0.15), 0.0), 1.0)
                votes = rng.randint(1, 4)
                likes = sum(rng.random() < taste for _ in range(votes))
                arms[arm].append((likes, votes - likes))
        decision = cr.decide(arms["canary"], arms["active"], check * 60.0, rule)
        if fixed_z is not None and not math.isnan(decision.variance):  # the naive fixed-horizon test
            width = fixed_z * math.sqrt(decision.variance)
            if decision.difference - width > -rule.margin:
                return cr.PROMOTE
            if decision.difference + width < 0:
                return cr.ROLLBACK
        elif decision.outcome != cr.CONTINUE:
            return decision.outcome
    return cr.CONTINUE


def test_repeated_checks_keep_wrong_decisions_rare_where_a_peeked_fixed_test_does_not() -> None:
    rule = cr.CanaryRule(min_votes=30, min_users=10, max_duration_s=10**9)
    runs = 150
    false_rollback = sum(simulate(0.0, rule, None, seed) == cr.ROLLBACK for seed in range(runs)) / runs
    false_promotion = sum(simulate(-rule.margin, rule, None, seed) == cr.PROMOTE for seed in range(runs)) / runs
    naive = sum(simulate(0.0, rule, 1.645, seed) == cr.ROLLBACK for seed in range(runs)) / runs
    assert false_rollback <= 0.05 and false_promotion <= 0.05, (false_rollback, false_promotion)
    assert naive >= 0.10 > false_rollback, naive  # the same data, peeked at 30 times with a 5% test
    # and the rule is not just silent: a clearly better canary is promoted within the 30 checks.
    assert sum(simulate(0.15, rule, None, seed) == cr.PROMOTE for seed in range(50)) >= 45


def test_votes_are_tallied_per_user_per_arm_from_the_last_rating() -> None:
    arms = {"feedloop-v8": "canary", "feedloop-v7": "active"}
    votes = [
        cr.Vote("app:ann", "c1", "feedloop-v8", "like", 100.0),
        cr.Vote("app:ann", "c1", "feedloop-v8", "dislike", 101.0),  # changed her mind: one dislike
        cr.Vote("app:ann", "c2", "feedloop-v8", "like", 102.0),
        cr.Vote("app:bob", "c3", "feedloop-v7", "like", 103.0),
        cr.Vote("app:bob", "c4", "feedloop-v7", "like", 104.0),
        cr.Vote("app:bob", "c4", "feedloop-v7", "withdrawn", 105.0),  # withdrawn: gone
        cr.Vote("app:cid", "c5", "feedloop-v7", "dislike", 50.0),  # before the canary started
        cr.Vote(None, "c6", "feedloop-v8", "like", 106.0),  # anonymous: cannot be counted per user
        cr.Vote("app:dan", "c7", "feedloop-v6", "like", 107.0),  # another version
        cr.Vote("app:eve", "c8", None, "like", 108.0),  # the base model
    ]
    tallies = cr.tally_votes(votes, arms, since=99.0)
    assert tallies == {"canary": {"app:ann": (1, 1)}, "active": {"app:bob": (1, 0)}}
    assert cr.tally_votes([], arms, since=0.0) == {"canary": {}, "active": {}}
    decision = cr.decide(tallies["canary"], tallies["active"], 60.0, RULE)
    assert decision.outcome == cr.CONTINUE and decision.canary.users == 1
