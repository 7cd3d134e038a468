"""bench/soak.py's "levels off" rule: last third vs middle third, floors, the LoRA slot cap, Redis per chat."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench.soak import SERIES, Series, judge, judge_series, metric_value, thirds, with_bytes_per_chat

REPO = Path(__file__).resolve().parents[3]
RSS = Series("rss", "RSS (MB)", floor=16.0)


def rows(column: str, values: Sequence[float], **extra: float) -> list[dict[str, float]]:
    return [{column: v, **extra} for v in values]


def test_thirds_put_the_remainder_in_the_last_third() -> None:
    assert thirds([1, 2, 3, 4, 5, 6, 7]) == ([1, 2], [3, 4], [5, 6, 7])
    assert thirds([1, 2]) == ([], [1], [2])


def test_a_warm_up_climb_then_a_plateau_levels_off() -> None:
    # the first third (warm-up) climbs 300 MB; the middle and last thirds differ by noise only
    verdict = judge_series(RSS, rows("rss", [200, 400, 500, 700, 702, 698, 705, 701, 703]), max_growth=0.10)
    assert verdict.ok
    assert verdict.middle == pytest.approx(700)
    assert verdict.last == pytest.approx(703)


def test_steady_growth_above_the_threshold_is_flagged() -> None:
    # +100 MB a sample: the last third's mean is 300 MB above the middle third's, far over 10 %
    verdict = judge_series(RSS, rows("rss", [500 + 100 * i for i in range(9)]), max_growth=0.10)
    assert not verdict.ok
    assert verdict.growth == pytest.approx(300)
    assert verdict.allowed == pytest.approx(0.10 * 900)
    assert "grows" in verdict.note


def test_growth_within_the_threshold_passes_and_the_threshold_is_the_option() -> None:
    values = [1000, 1000, 1000, 1000, 1050, 1080, 1080]  # middle 1025, last 1080: +5.4 %
    assert judge_series(RSS, rows("rss", values), max_growth=0.10).ok
    assert not judge_series(RSS, rows("rss", values), max_growth=0.05).ok


def test_the_floor_keeps_noise_on_small_values_from_being_growth() -> None:
    clients = Series("clients", "clients", floor=2.0)
    # 6 -> 8 clients is +33 %, but within the absolute floor of 2
    assert judge_series(clients, rows("clients", [6, 6, 6, 6, 8, 8]), max_growth=0.10).ok
    assert not judge_series(clients, rows("clients", [6, 6, 6, 6, 10, 10]), max_growth=0.10).ok


def test_lora_adapters_are_bounded_by_the_engine_slots_not_by_the_growth_rule() -> None:
    lora = next(s for s in SERIES if s.column == "lora_loaded")
    filling = [{"lora_loaded": n, "lora_slots_max": 4} for n in (0, 1, 1, 2, 3, 4, 4)]
    verdict = judge_series(lora, filling, max_growth=0.10)
    assert verdict.ok and verdict.note == "max 4 of 4 slots"
    over = [*filling, {"lora_loaded": 5, "lora_slots_max": 4}]
    assert not judge_series(lora, over, max_growth=0.10).ok


def test_too_few_or_missing_samples_are_not_judged_as_growth() -> None:
    assert judge_series(RSS, rows("rss", [100, 900]), max_growth=0.10).note == "too few samples"
    assert judge_series(RSS, rows("rss", [math.nan] * 6), max_growth=0.10).ok


def test_redis_memory_is_judged_per_chat() -> None:
    # memory linear in chats (2 KB a chat): bytes per chat levels off although memory itself keeps growing
    linear = [{"chats": 100 * i, "redis_used_mb": 5 + 100 * i * 2048 / 2**20} for i in range(9)]
    verdicts = {v.series.column: v for v in judge(with_bytes_per_chat(linear))}
    assert verdicts["redis_bytes_per_chat"].ok
    assert verdicts["redis_bytes_per_chat"].last == pytest.approx(2048)
    assert verdicts["redis_used_mb"].ok and verdicts["redis_used_mb"].note == "reported, not judged"
    # memory that also grows without chats (a leak): bytes per chat climbs
    leaking = [{"chats": 100 * i, "redis_used_mb": 5 + 0.2 * i + 0.05 * i * i} for i in range(9)]
    verdicts = {v.series.column: v for v in judge(with_bytes_per_chat(leaking))}
    assert not verdicts["redis_bytes_per_chat"].ok


def test_bytes_per_chat_is_nan_before_any_chat() -> None:
    out = with_bytes_per_chat([{"chats": 0, "redis_used_mb": 1.0}, {"chats": 0, "redis_used_mb": 2.0}])
    assert all(math.isnan(r["redis_bytes_per_chat"]) for r in out)


def test_metric_value_reads_an_unlabelled_gauge() -> None:
    text = (
        "# HELP feedloop_engine_lora_slots_used x\n# TYPE feedloop_engine_lora_slots_used gauge\n"
        "feedloop_engine_lora_slots_used 3.0\nfeedloop_engine_lora_slots_used_other 9.0\n"
    )
    assert metric_value(text, "feedloop_engine_lora_slots_used") == 3.0
    assert math.isnan(metric_value(text, "feedloop_engine_lora_slots_max"))


def test_help_works_without_starting_anything() -> None:
    done = subprocess.run(
        [sys.executable, "bench/soak.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--minutes" in done.stdout
