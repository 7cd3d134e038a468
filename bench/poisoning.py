"""Poisoning, measured: adversarial users vote for the opposite creator; the held-out target rate after one
training round, with and without the dataset caps.

Each scenario is one round of `feedloop demo --model toy` (the real API with auth on, Redis, Celery worker and
beat, trainer, gate, hot-swap): 40 simulated users like answers naming "Acme Labs"; a share of them (5, 10,
20%) are adversaries who rate every answer the opposite way from 4 chat loops each (high volume). Two ways
of attacking:

- ``volume``: each adversary is one user of an honest app (one name, many votes): the per-user cap
  (``FEEDLOOP_PAIRS__USER_CAP_FRACTION``, ``USER_CAP_MAX``) is the defence.
- ``sybil``: the adversaries hold one app key of their own and spread their chats and votes over 50 made-up
  user names each: per user they look small, so the per-app cap (``FEEDLOOP_PAIRS__APP_CAP_FRACTION``) is the
  defence.

Honest users are spread over 4 app keys (web0..web3), so a per-app cap of 25% binds no honest app. "Caps on"
is the product's defaults for the per-user cap (5% of a version, at most 50 pairs) and an app cap of 0.25;
"caps off" sets all three to no cap. Everything else (rate limits, one vote per identity, the consensus
filter, the gate) is the same in both. A reference scenario without adversaries gives the outcome the caps
must keep.

    .venv/bin/python bench/poisoning.py                       # the whole sweep (about 7 min per scenario)
    .venv/bin/python bench/poisoning.py --only clean,volume-10-caps,volume-10-nocaps
    .venv/bin/python bench/poisoning.py --seeds 0,1

Writes bench/results/poisoning.json (after every scenario, so a partial sweep is kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from demo.corpus import creators_for, named_creator  # noqa: E402
from demo.profiles import TOY  # noqa: E402
from demo.run import DemoOptions, Stack, run_demo  # noqa: E402
from demo.settings import get_demo_settings  # noqa: E402
from services.core.apikeys import ApiKeyStore  # noqa: E402
from services.core.config import get_settings  # noqa: E402

RESULTS = REPO / "bench" / "results" / "poisoning.json"
HONEST_KEYS = [f"flk-bench-web{i}-{'0' * 24}" for i in range(4)]
ADVERSARY_KEY = "flk-bench-mallory-" + "0" * 24
LIKES = "Acme Labs"
CAPS_ON = {"FEEDLOOP_PAIRS__APP_CAP_FRACTION": "0.25"}  # the per-user cap: the product's defaults
CAPS_OFF = {
    "FEEDLOOP_PAIRS__USER_CAP_FRACTION": "1",
    "FEEDLOOP_PAIRS__USER_CAP_MAX": "1000000",
    "FEEDLOOP_PAIRS__APP_CAP_FRACTION": "1",
}


@dataclass(frozen=True)
class Scenario:
    mode: str  # clean, volume or sybil
    fraction: float
    caps: bool

    @property
    def name(self) -> str:
        if self.mode == "clean":
            return "clean"
        return f"{self.mode}-{round(self.fraction * 100)}-{'caps' if self.caps else 'nocaps'}"


def scenarios(fractions: list[float]) -> list[Scenario]:
    out = [Scenario("clean", 0.0, True)]
    for fraction in fractions:
        for mode in ("volume", "sybil"):
            out += [Scenario(mode, fraction, True), Scenario(mode, fraction, False)]
    return out


def identity_pairs(dataset_dir: Path, likes: str, creators: tuple[str, ...]) -> dict[str, int]:
    """Identity pairs in the version trained on: poisoned ones choose an answer naming another creator (or
    reject one naming the liked creator); honest ones the other way round."""
    counts = {"pairs": 0, "identity": 0, "poisoned": 0, "honest": 0}
    for name in ("train.jsonl", "eval.jsonl"):
        path = dataset_dir / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            counts["pairs"] += 1
            chosen = named_creator(str(row["chosen"][-1].get("content") or ""), creators)
            rejected = named_creator(str(row["rejected"][-1].get("content") or ""), creators)
            if chosen is None and rejected is None:
                continue
            counts["identity"] += 1
            if (chosen is not None and chosen != likes) or rejected == likes:
                counts["poisoned"] += 1
            elif chosen == likes or (rejected is not None and rejected != likes):
                counts["honest"] += 1
    return counts


def run_scenario(scenario: Scenario, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from demo.run import _forget

    settings = get_settings()
    sim = get_demo_settings().simulate.model_copy(
        update={
            "users": args.users,
            "likes": LIKES,
            "adversarial_fraction": scenario.fraction,
            "adversarial_volume": args.volume,
            "seed": seed,
            "api_keys": HONEST_KEYS,
            "adversarial_api_key": ADVERSARY_KEY if scenario.mode == "sybil" else "",
            "adversarial_names": args.names if scenario.mode == "sybil" else 1,
        }
    )
    stacks: list[Stack] = []

    def register_keys(stack: Stack) -> None:
        stacks.append(stack)
        client = stack.redis()
        try:
            store = ApiKeyStore(client, stack.keys)
            for i, key in enumerate(HONEST_KEYS):
                store.add(key, f"web{i}")
            store.add(ADVERSARY_KEY, "mallory")
        finally:
            client.close()

    env = {
        "FEEDLOOP_API__AUTH": "true",
        "FEEDLOOP_API__BOOTSTRAP_APP_KEY": HONEST_KEYS[0],
        "FEEDLOOP_API__BOOTSTRAP_APP": "web0",
        "FEEDLOOP_API__APP_CHAT_RATE": "0",  # no chat quota: the users' pace is the engine's
        "FEEDLOOP_PAIRS__WEAKER_API_KEY": HONEST_KEYS[0],  # the worker's weaker answers come from the API
        **(CAPS_ON if scenario.caps else CAPS_OFF),
    }
    out = Path(tempfile.mkdtemp(prefix=f"poisoning-{scenario.name}-"))
    options = DemoOptions(
        rounds=1, identity_samples=args.samples, questions=args.questions, final_chats=0, out_dir=out, keep=True,
        profile=TOY, env=env, on_ready=register_keys,
    )  # fmt: skip
    started = time.monotonic()
    try:
        report = run_demo(settings, options, sim, echo=lambda _: None)
        (round_,) = report["rounds"]
        stack = stacks[0]
        dataset = round_.get("dataset_version")
        manifest: dict[str, Any] = {}
        pairs: dict[str, int] = {}
        if dataset:
            folder = stack.data_dir / "datasets" / dataset
            manifest = json.loads((folder / "manifest.json").read_text())
            pairs = identity_pairs(folder, LIKES, creators_for(LIKES))
        sim_stats = round_["simulation"]
        return {
            "scenario": scenario.name,
            "mode": scenario.mode,
            "adversarial_fraction": scenario.fraction,
            "caps": scenario.caps,
            "seed": seed,
            "target_before": report["baseline"]["target_rate"],
            "target_after": round_["after"]["target_rate"],
            "run_status": round_["run_status"],
            "gate_passed": (round_.get("gate") or {}).get("passed"),
            "pairs_used": round_["pairs_used"],
            "identity_pairs": pairs,
            "filters": manifest.get("filters"),
            "contributions_by_app": (manifest.get("contributions") or {}).get("apps"),
            "votes": sim_stats["votes"]["total"],
            "adversarial_votes": sim_stats["adversarial_votes"],
            "rate_limited": sim_stats["rate_limited"],
            "accuracy_before": report["baseline"]["accuracy"],
            "accuracy_after": round_["after"]["accuracy"],
            "wall_s": round(time.monotonic() - started, 1),
        }
    finally:
        if stacks:
            redis_url = stacks[0].redis_url
            _forget(redis_url, stacks[0].keys.prefix, stacks[0].data_dir)
        shutil.rmtree(out, ignore_errors=True)


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | seed | target before | target after | identity pairs poisoned / total "
        "| adversarial votes / votes | pairs | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['seed']} | error: {r['error'][:80]} | | | | | |")
            continue
        ip = r["identity_pairs"] or {}
        lines.append(
            f"| {r['scenario']} | {r['seed']} | {r['target_before']:.1%} | **{r['target_after']:.1%}** | "
            f"{ip.get('poisoned', 0)} / {ip.get('identity', 0)} | {r['adversarial_votes']} / {r['votes']} | "
            f"{r['pairs_used']} | {r['run_status']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="0.05,0.1,0.2", help="Adversarial shares of the users.")
    parser.add_argument("--seeds", default="0", help="Seeds of the users' choices (one sweep each).")
    parser.add_argument("--only", default="", help="Comma-separated scenario names (default: all).")
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--volume", type=int, default=4, help="Chat loops per adversary (an honest user: 1).")
    parser.add_argument("--names", type=int, default=50, help="Made-up user names per sybil adversary.")
    parser.add_argument("--samples", type=int, default=120, help="Identity answers sampled per measurement.")
    parser.add_argument("--questions", type=int, default=40, help="Held-out arithmetic/fact questions measured.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("FEEDLOOP_LOG_LEVEL", "WARNING")
    every = {s.name: s for s in scenarios([float(f) for f in args.fractions.split(",")])}
    wanted = [name for name in args.only.split(",") if name]
    unknown = [name for name in wanted if name not in every]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; known: {', '.join(every)}")
    todo = [every[name] for name in wanted] if wanted else list(every.values())
    results: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for scenario in todo:
            print(f"poisoning: {scenario.name} seed {seed} ...", file=sys.stderr, flush=True)
            try:
                result = run_scenario(scenario, seed, args)
            except Exception as error:  # one failed scenario must not lose the others' numbers
                result = {"scenario": scenario.name, "seed": seed, "error": f"{type(error).__name__}: {error}"}
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                           indent=2))  # fmt: skip
    print(table(results))


if __name__ == "__main__":
    main()
