"""The voter rule replayed on a kept demo's votes: which adversaries it finds, at each snapshot's time.

`feedloop demo --keep` leaves the demo's Redis keys (prefix ``<redis_prefix>-demo-<stamp>``) and its data folder
(``data/demo/<stamp>``, one manifest per dataset version). For every version this reads the votes cast up to the
version's ``created_at`` and judges the voters with ``consensus.peel_unreliable_voters``, side by side: the prompt
votes smoothed towards the crowd's like rate of the served model (the rule now) and towards one half (the rule
before 2026-12-08). Who is an adversary comes from the demo report's simulate settings (users, adversarial
share and volume, seed): ``demo.simulate.make_users`` places them.

The replay reads the prompt groups of every labelled completion; a snapshot reads only those of its own pairs, so
the replay judges each voter on at least the votes the snapshot saw.

    .venv/bin/python bench/voter_replay.py data/demo/<stamp> --report <out>/demo-report.json [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.simulate import make_users
from services.core.config import get_settings
from services.core.keys import Keys
from workers.pairing import consensus
from workers.pairing.store import PairsStore, parse_votes

RULES = {"crowd": True, "half": False}  # center_on_crowd


def votes_until(store: PairsStore, cutoff: float) -> list[list[consensus.Vote]]:
    """Each prompt group's votes (identity, rating, answer, served model) cast up to cutoff (epoch seconds)."""
    cids = [record["completion_id"] for record, _ in store.labeled_completions()]
    groups: defaultdict[str, list[consensus.Vote]] = defaultdict(list)
    for start in range(0, len(cids), 2000):
        for record, votes in store.completions_with_votes(cids[start : start + 2000]).values():
            cast = [
                (vote.voter, vote.rating)
                for vote in parse_votes(votes)
                if vote.created_at <= cutoff and vote.rating in ("like", "dislike")
            ]
            groups[str(record.get("prompt_hash") or "")].extend(consensus.answer_votes(record, cast))
    return list(groups.values())


def judge(groups: list[list[consensus.Vote]], adversaries: set[str], flip_odds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for rule, center_on_crowd in RULES.items():
        found = consensus.peel_unreliable_voters(groups, flip_odds, center_on_crowd=center_on_crowd)
        evidence = consensus.voter_evidence(groups, center_on_crowd)
        honest = [e.log_odds for who, e in evidence.items() if who not in adversaries]
        out[rule] = {
            "adversaries_found": len(found & adversaries),
            "honest_left_out": sorted(found - adversaries),
            "adversary_log_odds": sorted(round(evidence[w].log_odds, 2) for w in adversaries if w in evidence),
            "honest_max_log_odds": round(max(honest), 2) if honest else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", type=Path, help="the demo's kept data folder, data/demo/<stamp>")
    parser.add_argument("--report", type=Path, required=True, help="the demo's demo-report.json")
    parser.add_argument("--prefix", help="Redis key prefix (default: <redis_prefix>-demo-<stamp>)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    settings = get_settings()
    sim = json.loads(args.report.read_text())["simulate"]
    users = make_users(sim["users"], sim["adversarial_fraction"], sim["adversarial_volume"], sim["seed"])
    adversaries = {user.name for user in users if user.adversarial}
    prefix = args.prefix or f"{settings.redis_prefix}-demo-{args.data_dir.name}"
    store = PairsStore(Redis.from_url(settings.redis_url), Keys(prefix))
    flip_odds = settings.pairs.voter_flip_odds
    rows = []
    for path in sorted(args.data_dir.glob("datasets/ds-*/manifest.json")):
        manifest = json.loads(path.read_text())
        groups = votes_until(store, manifest["created_at"])
        row = {
            "version": manifest["version"],
            "votes": sum(map(len, groups)),
            "unreliable_at_snapshot": manifest.get("unreliable_voters"),
            **judge(groups, adversaries, flip_odds),
        }
        rows.append(row)
        for rule in RULES:
            r = row[rule]
            print(
                f"{row['version']} {row['votes']:5d} votes · {rule:5s}: adversaries found "
                f"{r['adversaries_found']}/{len(adversaries)} (log-odds {r['adversary_log_odds']}, threshold "
                f"{math.log(flip_odds):.2f}) · honest left out {len(r['honest_left_out'])} "
                f"(highest honest log-odds {r['honest_max_log_odds']})"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"seed": sim["seed"], "likes": sim["likes"], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
