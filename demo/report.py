"""The demo's report: a table per round, demo-report.json, and a chart of target rate and like-rate per version.

Pure formatting over plain dicts (what demo/run.py records), so it is testable without a stack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

COLUMNS = (
    "round",
    "adapter",
    "pairs used",
    "training",
    "gate",
    "trigger→serving",
    "target rate",
    "accuracy",
    "like-rate",
)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _gate(round_: dict[str, Any]) -> str:
    gate = round_.get("gate") or {}
    status = round_.get("run_status") or "-"
    if "passed" not in gate:
        return status
    verdict = "pass" if gate["passed"] else "fail"
    accuracy = ((gate.get("metrics") or gate).get("candidate") or {}).get("accuracy")
    return f"{verdict} ({accuracy:.0%})" if isinstance(accuracy, int | float) else verdict


def regression_line(round_: dict[str, Any]) -> str | None:
    """The gate's regression set in one line: how many cases the reference and the candidate answer right, and the
    cases lost and gained (None when the gate had no regression set)."""
    gate = round_.get("gate") or {}
    retention = (gate.get("metrics") or gate).get("retention")
    if not retention or "accuracy" not in retention:
        return None
    paired, cases = retention["accuracy"], retention["cases"]
    before, after = _right_before_after(paired)
    line = (
        f"gate regression set: {before}/{cases} right before → {after}/{cases} after "
        f"({paired['only_second']} lost, {paired['only_first']} gained; kept {retention['rate']:.1%} of the right ones)"
    )
    kinds = [
        "{} {} → {} of {}".format(kind, *_right_before_after(part["accuracy"]), part["cases"])
        for kind, part in (retention.get("by_kind") or {}).items()
    ]
    return line + ("; " + ", ".join(kinds) if kinds else "")


def _right_before_after(paired: dict[str, Any]) -> tuple[int, int]:
    """Cases the reference and the candidate answer right, from a paired comparison (candidate first)."""
    return paired["both"] + paired["only_second"], paired["both"] + paired["only_first"]


def round_row(round_: dict[str, Any]) -> list[str]:
    before, after = round_.get("before") or {}, round_.get("after") or {}
    return [
        str(round_["round"]),
        round_.get("version") or "-",
        "-" if round_.get("pairs_used") is None else str(round_["pairs_used"]),
        _seconds(round_.get("training_s")),
        _gate(round_),
        _seconds(round_.get("trigger_to_serving_s")),
        f"{percent(before.get('target_rate'))} → {percent(after.get('target_rate'))}",
        f"{percent(before.get('accuracy'))} → {percent(after.get('accuracy'))}",
        percent(round_.get("like_rate")),
    ]


def render_table(rounds: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS), *(round_row(r) for r in rounds)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"

    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])


def per_version(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per version served in turn: the base (or what served first), then each promoted adapter,
    with its measured target rate and accuracy and the like-rate of the users' votes on its answers."""
    points: list[dict[str, Any]] = []
    rounds = report.get("rounds", [])
    if rounds:
        first = rounds[0]
        points.append(
            {
                "version": first.get("served_before") or "base",
                "target_rate": (first.get("before") or {}).get("target_rate"),
                "accuracy": (first.get("before") or {}).get("accuracy"),
                "like_rate": first.get("like_rate"),
            }
        )
    for index, round_ in enumerate(rounds):
        if round_.get("run_status") != "promoted" or not round_.get("version"):
            continue
        following = rounds[index + 1] if index + 1 < len(rounds) else None
        like_rate = following.get("like_rate") if following else (report.get("final_check") or {}).get("like_rate")
        points.append(
            {
                "version": round_["version"],
                "target_rate": (round_.get("after") or {}).get("target_rate"),
                "accuracy": (round_.get("after") or {}).get("accuracy"),
                "like_rate": like_rate,
            }
        )
    return points


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def write_chart(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = per_version(report)
    labels = [p["version"] for p in points]
    x = list(range(len(points)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    series = (
        ("target_rate", f"held-out answers naming {report.get('likes', 'the liked creator')}", "o-"),
        ("accuracy", "held-out arithmetic + fact accuracy", "s--"),
        ("like_rate", "like-rate of simulated users' votes", "^-"),
    )
    for key, label, style in series:
        values = [p[key] if p[key] is not None else float("nan") for p in points]
        ax.plot(x, [v * 100 for v in values], style, label=label)
    ax.set_xticks(x, labels)
    ax.set_ylim(-2, 102)
    ax.set_ylabel("%")
    ax.set_xlabel("version served by the alias")
    ax.set_title("feedloop demo: feedback → DPO adapters → hot-swap")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
