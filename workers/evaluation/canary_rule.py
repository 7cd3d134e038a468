"""The canary's decision rule: promote, roll back, keep waiting, or time out, from live thumbs per user.

Pure logic (tallies in, a decision out; no Redis, no Celery). The beat task collects, for the canary's
period only and only for identified users, each user's likes and dislikes on each arm (:func:`tally_votes`,
from the feedback events), and calls :func:`decide` at every check.

**Per user, not per vote.** Each user is one observation: their like-share on their arm (likes / votes).
One heavy voter weighs as much as a user who voted once, so nobody can decide a rollout by voting a lot.
An arm's like-rate is the mean of its users' shares; the statistic is the difference
``theta = like_rate(canary) - like_rate(active)``.

**Valid under repeated checks.** A fixed-horizon test (a z-interval) checked after every batch of votes
stops on noise far more often than its nominal 5% (bench/canary_decision.py measures it). The rule uses
an always-valid confidence sequence instead: the normal-mixture sequential probability ratio test
(mSPRT; Robbins 1970, Johari et al. 2017). With ``theta_hat ~ N(theta, V)`` (V: the variance of the
difference of the two arm means) and a N(theta0, tau^2) mixture over alternatives, the mixture likelihood
ratio is::

    Lambda(theta0) = sqrt(V / (V + tau^2)) * exp(tau^2 (theta_hat - theta0)^2 / (2 V (V + tau^2)))

and by Ville's inequality ``P(sup_t Lambda_t(theta) >= 1/a) <= a`` for the true theta, however often it
is looked at. The set of theta0 with ``Lambda(theta0) < 1/a`` is the confidence sequence
``theta_hat +- halfwidth(V)``. Each decision is one-sided, so the sequence is built at ``a = 2 * alpha``:
one side of the two-sided normal mixture is (up to a negligible term) the one-sided half-normal mixture
at level alpha, so each wrong decision has probability about alpha or less.

* **promote** when the lower bound is above ``-margin`` (the canary is not worse by more than the margin);
* **rollback** when the upper bound is below 0 (the canary is worse);
* **keep_active** when ``max_duration_s`` has passed without either (conservative: the active adapter stays);
* **continue** otherwise, and always while an arm has fewer than ``min_votes`` votes or ``min_users`` users.

V is estimated from the users' shares (plug-in, as in Johari et al.), shrunk towards the largest variance
a [0, 1] share with the pooled mean can have, ``p (1 - p)``, by ``prior_users`` pseudo-users, so that a
handful of users who happen to agree cannot make the interval collapse. The defaults keep both error
rates at or below 5% in bench/canary_decision.py (1,000 simulated canaries per case).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Outcome = Literal["continue", "promote", "rollback", "keep_active"]
CONTINUE: Outcome = "continue"
PROMOTE: Outcome = "promote"
ROLLBACK: Outcome = "rollback"
KEEP_ACTIVE: Outcome = "keep_active"
OUTCOMES: tuple[Outcome, ...] = (CONTINUE, PROMOTE, ROLLBACK, KEEP_ACTIVE)

# A user's (likes, dislikes) on one arm during the canary.
Tally = tuple[int, int]


@dataclass(frozen=True)
class CanaryRule:
    margin: float = 0.05  # non-inferiority margin on the per-user like-rate (0.05 = 5 points)
    alpha: float = 0.05  # bound on each wrong decision (false promotion, false rollback)
    tau: float = 0.05  # sd of the normal mixture: the size of differences the test is tuned for
    min_votes: int = 30  # per arm, before any decision
    min_users: int = 10  # per arm, before any decision
    max_duration_s: float = 48 * 3600.0  # then keep_active
    prior_users: float = 4.0  # pseudo-users shrinking the share variance towards p(1-p)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        if self.margin < 0 or self.tau <= 0 or self.prior_users < 0:
            raise ValueError("margin >= 0, tau > 0 and prior_users >= 0 are required")


@dataclass(frozen=True)
class ArmStats:
    users: int
    votes: int
    likes: int
    like_rate: float  # mean of the users' like-shares (the rule's statistic)
    vote_like_rate: float  # likes / votes (for display: heavy voters weigh more here)
    share_variance: float  # sample variance of the users' shares (0 below two users)

    @property
    def share_sum(self) -> float:
        return self.like_rate * self.users


@dataclass(frozen=True)
class CanaryDecision:
    outcome: Outcome
    reason: str
    difference: float  # like_rate(canary) - like_rate(active); nan before both arms have users
    lower: float  # always-valid bounds on the difference (nan until both arms have enough data)
    upper: float
    variance: float  # V, the (shrunk) variance of the difference
    elapsed_s: float
    canary: ArmStats
    active: ArmStats
    rule: CanaryRule

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("difference", "lower", "upper", "variance"):  # JSON has no nan
            if math.isnan(data[name]):
                data[name] = None
        return data


@dataclass(frozen=True)
class Vote:
    """One feedback event as the decision sees it (services/feedback/events.FeedbackEvent has these fields)."""

    user: str | None  # the app-namespaced user id; None for anonymous votes (left out of the decision)
    completion_id: str
    adapter: str | None  # the version that produced the rated answer
    rating: str  # like, dislike or withdrawn
    created_at: float


def tally_votes(votes: Iterable[Vote], arms: Mapping[str, str], since: float) -> dict[str, dict[str, Tally]]:
    """Per arm, per user: (likes, dislikes) over the canary's period, from the feedback events in order.

    ``arms`` maps an adapter version to its arm name (e.g. ``{"feedloop-v8": "canary", "feedloop-v7":
    "active"}``); answers of other versions are ignored. A user's last rating of a completion counts (a
    changed vote replaces the first; ``withdrawn`` removes it). Anonymous votes and votes before ``since``
    are left out. Returns ``{arm: {user: (likes, dislikes)}}`` with every arm present.
    """
    last: dict[tuple[str, str], tuple[str, str]] = {}
    for vote in votes:
        arm = arms.get(vote.adapter or "")
        if vote.user is None or vote.created_at < since or arm is None:
            continue
        key = (vote.user, vote.completion_id)
        if vote.rating == "withdrawn":
            last.pop(key, None)
        elif vote.rating in ("like", "dislike"):
            last[key] = (arm, vote.rating)
    counts: dict[str, dict[str, list[int]]] = {arm: {} for arm in arms.values()}
    for (user, _), (arm, rating) in last.items():
        tally = counts[arm].setdefault(user, [0, 0])
        tally[0 if rating == "like" else 1] += 1
    return {
        arm: {user: (likes, dislikes) for user, (likes, dislikes) in users.items()} for arm, users in counts.items()
    }


def arm_stats(tallies: Iterable[Tally] | Mapping[Any, Tally]) -> ArmStats:
    """One arm's per-user statistics from (likes, dislikes) per user; users without votes are skipped."""
    values = tallies.values() if isinstance(tallies, Mapping) else tallies
    shares: list[float] = []
    votes = likes = 0
    for user_likes, user_dislikes in values:
        if user_likes < 0 or user_dislikes < 0:
            raise ValueError("vote counts cannot be negative")
        total = user_likes + user_dislikes
        if total == 0:
            continue
        shares.append(user_likes / total)
        votes += total
        likes += user_likes
    users = len(shares)
    mean = sum(shares) / users if users else math.nan
    variance = sum((s - mean) ** 2 for s in shares) / (users - 1) if users > 1 else 0.0
    return ArmStats(
        users=users,
        votes=votes,
        likes=likes,
        like_rate=mean,
        vote_like_rate=likes / votes if votes else math.nan,
        share_variance=variance,
    )


def shrunk_variance(share_variance, users, pooled_rate, prior_users: float):
    """Variance of one user's share, shrunk towards p(1-p) (the largest a [0,1] value with mean p can have).

    Works elementwise on numpy arrays (the bench) as on floats."""
    p = np.clip(pooled_rate, 0.05, 0.95)
    prior = p * (1.0 - p)
    dof = np.maximum(np.asarray(users, dtype=float) - 1.0, 0.0)
    return (dof * share_variance + prior_users * prior) / np.maximum(dof + prior_users, 1e-12)


def halfwidth(variance, tau: float, alpha: float):
    """Half-width of the normal-mixture confidence sequence at level 2*alpha (one-sided alpha per side)."""
    v = np.maximum(variance, 1e-300)
    t2 = tau * tau
    return np.sqrt(2.0 * v * (v + t2) / t2 * (math.log(1.0 / (2.0 * alpha)) + 0.5 * np.log((v + t2) / v)))


def difference_variance(canary: ArmStats, active: ArmStats, rule: CanaryRule) -> float:
    pooled = (canary.share_sum + active.share_sum) / (canary.users + active.users)
    var_c = shrunk_variance(canary.share_variance, canary.users, pooled, rule.prior_users)
    var_a = shrunk_variance(active.share_variance, active.users, pooled, rule.prior_users)
    return float(var_c / canary.users + var_a / active.users)


def decide(
    canary: Iterable[Tally] | Mapping[Any, Tally],
    active: Iterable[Tally] | Mapping[Any, Tally],
    elapsed_s: float,
    rule: CanaryRule | None = None,
) -> CanaryDecision:
    """The decision at one check, from each arm's per-user (likes, dislikes) since the canary started."""
    rule = rule or CanaryRule()
    c, a = arm_stats(canary), arm_stats(active)
    timed_out = elapsed_s >= rule.max_duration_s
    nan = math.nan
    difference = c.like_rate - a.like_rate if c.users and a.users else nan

    def result(outcome: Outcome, reason: str, lower: float = nan, upper: float = nan, var: float = nan):
        return CanaryDecision(outcome, reason, difference, lower, upper, var, elapsed_s, c, a, rule)

    short = [
        f"{name} has {stats.votes} votes from {stats.users} users (needs {rule.min_votes} and {rule.min_users})"
        for name, stats in (("canary", c), ("active", a))
        if stats.votes < rule.min_votes or stats.users < rule.min_users
    ]
    if short:
        if timed_out:
            return result(KEEP_ACTIVE, f"timeout after {elapsed_s:.0f}s: " + "; ".join(short))
        return result(CONTINUE, "; ".join(short))

    variance = difference_variance(c, a, rule)
    width = float(halfwidth(variance, rule.tau, rule.alpha))
    lower, upper = difference - width, difference + width
    bounds = (
        f"like-rate {c.like_rate:.3f} vs {a.like_rate:.3f}, difference {difference:+.3f} [{lower:+.3f}, {upper:+.3f}]"
    )
    if lower > -rule.margin:
        return result(
            PROMOTE, f"not worse than active by more than {rule.margin:.3f}: {bounds}", lower, upper, variance
        )
    if upper < 0:
        return result(ROLLBACK, f"worse than active: {bounds}", lower, upper, variance)
    if timed_out:
        return result(
            KEEP_ACTIVE, f"undecided after {elapsed_s:.0f}s, keeping active: {bounds}", lower, upper, variance
        )
    return result(CONTINUE, f"undecided: {bounds}", lower, upper, variance)
