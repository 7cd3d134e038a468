"""The canary decision rule in simulation: speed and error rates, against a naive test peeked at each check.

    .venv/bin/python bench/canary_decision.py [--sims 1000] [--vote-rate 30] [--share 0.1] [--seed 0]

numpy only, no services. Each simulated canary is a population of ``--users`` users with heavy-tailed
activity (lognormal weights, sigma 1.25: a few users vote far more than the rest), each assigned to the
canary with probability ``--share`` (the sticky hash split) and with their own like probability drawn
from Beta(k p, k (1 - p)) around their arm's like-rate p (k = 8: users differ). Votes arrive at
``--vote-rate`` votes per minute over all users; the decision runs every ``--check-min`` minutes (the beat
task) on the per-user tallies so far, up to the rule's max duration (then: keep active).

Cases: the active adapter's like-rate is 0.60; the canary's differs by -20 ... +20 points. A correct
decision is promote when the canary is not worse (difference >= 0) and rollback when it is worse
(-5 points sits on the 5-point margin: promoting it is the false promotion the rule must keep <= 5%;
an equal canary rolled back is the false rollback, also <= 5%).

Side by side on the same simulated votes:

* ``sequential``: workers/evaluation/canary_rule.py (always-valid normal-mixture confidence sequence);
* ``naive``: the same per-user statistic and variance, but a fixed-horizon one-sided 95% z-interval
  (1.645 standard errors) looked at after every check: what one gets by re-running a classical test on a
  dashboard until it says something.

The vectorised simulation calls canary_rule's own variance and half-width functions, and a sample of
checks is re-decided with canary_rule.decide() from the raw tallies (the bench fails if they disagree).
Writes bench/results/canary_decision.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workers.evaluation import canary_rule as cr

ACTIVE_RATE = 0.60
DIFFERENCES = (-0.20, -0.10, -0.05, 0.0, 0.05, 0.10, 0.20)
CONCENTRATION = 8.0
ACTIVITY_SIGMA = 1.25
NAIVE_Z = 1.645
RESULTS = Path(__file__).resolve().parent / "results" / "canary_decision.json"
UNDECIDED = -1
CODES = {cr.PROMOTE: 0, cr.ROLLBACK: 1, cr.KEEP_ACTIVE: 2}


def simulate(
    difference: float, rule: cr.CanaryRule, args: argparse.Namespace, rng: np.random.Generator
) -> dict[str, Any]:
    sims, users = args.sims, args.users
    per_check = round(args.vote_rate * args.check_min)
    checks = math.ceil(rule.max_duration_s / (args.check_min * 60))
    weights = rng.lognormal(0.0, ACTIVITY_SIGMA, users)
    weights /= weights.sum()
    arm = (rng.random((sims, users)) < args.share).astype(np.int64)  # 1 = canary
    rates = np.where(arm == 1, ACTIVE_RATE + difference, ACTIVE_RATE)
    like_p = rng.beta(CONCENTRATION * rates, CONCENTRATION * (1 - rates))
    likes = np.zeros(sims * users, dtype=np.int64)
    votes = np.zeros(sims * users, dtype=np.int64)
    arm_flat, like_flat = arm.ravel(), like_p.ravel()
    # per sim and arm (0 active, 1 canary): users with votes, sum of shares, sum of squared shares, votes
    n_users = np.zeros((sims, 2))
    share_sum = np.zeros((sims, 2))
    share_sq = np.zeros((sims, 2))
    arm_votes = np.zeros((sims, 2))

    outcome = {"sequential": np.full(sims, UNDECIDED), "naive": np.full(sims, UNDECIDED)}
    at_check = {name: np.zeros(sims, dtype=np.int64) for name in outcome}
    votes_at = {name: np.zeros((sims, 2)) for name in outcome}
    verified = 0
    for check in range(1, checks + 1):
        idx = rng.choice(users, size=(sims, per_check), p=weights)
        flat = (np.arange(sims)[:, None] * users + idx).ravel()
        liked = (rng.random(flat.size) < like_flat[flat]).astype(np.int64)
        touched = np.unique(flat)
        old_votes, old_likes = votes[touched], likes[touched]
        np.add.at(votes, flat, 1)
        np.add.at(likes, flat, liked)
        new_votes, new_likes = votes[touched], likes[touched]
        old_share = np.where(old_votes > 0, old_likes / np.maximum(old_votes, 1), 0.0)
        new_share = new_likes / new_votes
        where = (touched // users, arm_flat[touched])
        np.add.at(n_users, where, (old_votes == 0).astype(float))
        np.add.at(share_sum, where, new_share - old_share)
        np.add.at(share_sq, where, new_share**2 - old_share**2)
        np.add.at(arm_votes, (flat // users, arm_flat[flat]), 1.0)

        n = np.maximum(n_users, 1)
        mean = share_sum / n
        var = np.where(n_users > 1, (share_sq - n * mean**2) / np.maximum(n_users - 1, 1), 0.0)
        var = np.maximum(var, 0.0)
        diff = mean[:, 1] - mean[:, 0]
        enough = ((arm_votes >= rule.min_votes) & (n_users >= rule.min_users)).all(axis=1)
        pooled = share_sum.sum(axis=1) / n.sum(axis=1)
        shrunk = cr.shrunk_variance(var, n_users, pooled[:, None], rule.prior_users)
        v_seq = (shrunk / n).sum(axis=1)
        v_naive = (np.where(n_users > 1, var, shrunk) / n).sum(axis=1)
        widths = {"sequential": cr.halfwidth(v_seq, rule.tau, rule.alpha), "naive": NAIVE_Z * np.sqrt(v_naive)}
        final = check == checks
        for name, width in widths.items():
            todo = outcome[name] == UNDECIDED
            promote = todo & enough & (diff - width > -rule.margin)
            rollback = todo & enough & ~promote & (diff + width < 0)
            timeout = todo & ~promote & ~rollback & final
            for mask, code in ((promote, 0), (rollback, 1), (timeout, 2)):
                outcome[name][mask] = code
                at_check[name][mask] = check
                votes_at[name][mask] = arm_votes[mask]
        if check % max(1, checks // 6) == 0 and verified < 12:
            verified += verify(sims, users, arm_flat, likes, votes, check, args, rule, outcome, at_check)
        if all((o != UNDECIDED).all() for o in outcome.values()):
            break
    return {name: summarise(outcome[name], at_check[name], votes_at[name], difference, args) for name in outcome}


def verify(sims, users, arm_flat, likes, votes, check, args, rule, outcome, at_check) -> int:
    """Re-decide a few simulations at this check with canary_rule.decide() from the raw per-user tallies."""
    checked = 0
    elapsed = check * args.check_min * 60
    for sim in range(0, sims, max(1, sims // 3)):
        part = slice(sim * users, (sim + 1) * users)
        tallies: dict[int, list[tuple[int, int]]] = {0: [], 1: []}
        for a, lk, vt in zip(arm_flat[part], likes[part], votes[part], strict=True):
            if vt:
                tallies[int(a)].append((int(lk), int(vt - lk)))
        decision = cr.decide(tallies[1], tallies[0], elapsed, rule)
        code = CODES.get(decision.outcome, UNDECIDED)
        decided_now = at_check["sequential"][sim] == check
        expected = outcome["sequential"][sim] if decided_now else UNDECIDED
        if outcome["sequential"][sim] != UNDECIDED and not decided_now:
            continue  # decided earlier; the vectorised run stopped looking at it
        if code != expected:
            raise SystemExit(f"vectorised rule and canary_rule.decide disagree at sim {sim}, check {check}: {decision}")
        checked += 1
    return checked


def summarise(outcome, at_check, votes_at, difference: float, args) -> dict[str, Any]:
    sims = outcome.size
    correct_code = 0 if difference >= 0 else 1
    rate = {name: float((outcome == code).mean()) for name, code in CODES.items()}
    correct = outcome == correct_code
    hours = at_check * args.check_min / 60

    def quantiles(values) -> dict[str, float | None]:
        if not values.size:
            return {"median": None, "p90": None}
        return {"median": float(np.median(values)), "p90": float(np.quantile(values, 0.9))}

    return {
        "sims": sims,
        "rates": rate,
        "correct": float(correct.mean()),
        "wrong": rate[cr.ROLLBACK if correct_code == 0 else cr.PROMOTE],
        "hours_to_correct": quantiles(hours[correct]),
        "votes_to_correct": quantiles(votes_at[correct].sum(axis=1)),
        "canary_votes_to_correct": quantiles(votes_at[correct][:, 1]),
    }


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(results: dict[str, Any]) -> str:
    lines = [
        "| canary - active | correct | rule | correct rate | wrong decision | timeout (keep active) "
        "| votes to correct (median / p90) | canary votes (median) | hours to correct (median / p90) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in results["cases"]:
        d = case["difference"]
        wrong_name = "false rollback" if d >= 0 else "false promotion"
        for name in ("sequential", "naive"):
            r = case[name]
            lines.append(
                f"| {d * 100:+.0f} pts | {'promote' if d >= 0 else 'rollback'} | {name} | {r['correct']:.1%} "
                f"| {r['wrong']:.1%} ({wrong_name}) | {r['rates'][cr.KEEP_ACTIVE]:.1%} "
                f"| {fmt(r['votes_to_correct']['median'])} / {fmt(r['votes_to_correct']['p90'])} "
                f"| {fmt(r['canary_votes_to_correct']['median'])} "
                f"| {fmt(r['hours_to_correct']['median'], 1)} / {fmt(r['hours_to_correct']['p90'], 1)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=1000, help="simulated canaries per case")
    parser.add_argument("--users", type=int, default=5000, help="users in the population")
    parser.add_argument("--vote-rate", type=float, default=30.0, help="votes per minute over all users")
    parser.add_argument("--share", type=float, default=0.1, help="share of users routed to the canary")
    parser.add_argument("--check-min", type=float, default=5.0, help="minutes between two decisions (beat)")
    parser.add_argument("--max-hours", type=float, default=None, help="max duration (default: the rule's)")
    parser.add_argument("--differences", type=float, nargs="*", default=list(DIFFERENCES))
    parser.add_argument("--rule", nargs="*", default=[], metavar="NAME=VALUE", help="override a CanaryRule field")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    overrides = {name: float(value) for name, _, value in (item.partition("=") for item in args.rule)}
    if args.max_hours is not None:
        overrides["max_duration_s"] = args.max_hours * 3600
    rule = cr.CanaryRule(**{**cr.CanaryRule().__dict__, **overrides})
    started = time.time()
    rng = np.random.default_rng(args.seed)
    cases = []
    for difference in args.differences:
        case_start = time.monotonic()
        case = {"difference": difference, **simulate(difference, rule, args, rng)}
        case["runtime_s"] = round(time.monotonic() - case_start, 1)
        cases.append(case)
        print(f"  {difference:+.2f}: done in {case['runtime_s']}s", file=sys.stderr)
    results = {
        "benchmark": "canary_decision",
        "started_at": started,
        "duration_s": round(time.time() - started, 1),
        "setup": {
            "sims_per_case": args.sims,
            "users": args.users,
            "vote_rate_per_min": args.vote_rate,
            "canary_share": args.share,
            "check_interval_min": args.check_min,
            "active_like_rate": ACTIVE_RATE,
            "user_rate_concentration": CONCENTRATION,
            "activity_lognormal_sigma": ACTIVITY_SIGMA,
            "naive_z": NAIVE_Z,
            "seed": args.seed,
        },
        "rule": rule.__dict__,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
