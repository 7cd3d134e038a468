"""The held-out split's minimum size (workers/pairing/datasets.eval_threshold), on pair ids alone."""

from __future__ import annotations

from workers.pairing.datasets import eval_bucket, eval_threshold, is_eval


def held_out(ids: list[str], threshold: float) -> set[str]:
    return {pid for pid in ids if is_eval(pid, threshold)}


def test_a_small_snapshot_holds_out_the_minimum_by_the_same_hash_order() -> None:
    ids = [f"pair-{i}" for i in range(230)]  # the demo's first snapshot: ~23 pairs at eval_fraction 0.1
    assert len(held_out(ids, 0.1)) < 40
    threshold = eval_threshold(ids, 0.1, 40, 0.25, previous=None)
    chosen = held_out(ids, threshold)
    assert len(chosen) == 40
    assert held_out(ids, 0.1) <= chosen  # the usual held-out pairs stay held out; the next-smallest join
    assert max(eval_bucket(pid) for pid in chosen) < min(eval_bucket(pid) for pid in set(ids) - chosen)


def test_the_bar_is_capped_and_unneeded_on_large_snapshots() -> None:
    few = [f"pair-{i}" for i in range(60)]
    assert eval_threshold(few, 0.1, 40, 0.25, previous=None) == 0.25  # at most a quarter of the pairs
    many = [f"pair-{i}" for i in range(2000)]
    assert eval_threshold(many, 0.1, 40, 0.25, previous=None) == 0.1
    assert eval_threshold(few, 0.1, 0, 0.25, previous=None) == 0.1  # min_eval_pairs 0: the plain fraction
    assert eval_threshold(few, 0.3, 40, 0.25, previous=None) == 0.3  # eval_fraction above the cap wins
    assert eval_threshold([], 0.1, 40, 0.25, previous=None) == 0.1


def test_a_pair_trained_on_is_never_held_out_later() -> None:
    ids = [f"pair-{i}" for i in range(230)]
    first = eval_threshold(ids, 0.1, 40, 0.25, previous=None)
    trained = set(ids) - held_out(ids, first)
    # More data: the bar falls, held-out pairs may move to training ...
    grown = ids + [f"pair-{i}" for i in range(230, 330)]
    second = eval_threshold(grown, 0.1, 40, 0.25, previous=first)
    assert second < first and held_out(grown, second) <= held_out(grown, first)
    # ... and when pairs drop out (votes changed), the bar does not rise back over pairs already trained on.
    shrunk = ids[:150]
    third = eval_threshold(shrunk, 0.1, 40, 0.25, previous=second)
    assert third == second and not held_out(shrunk, third) & trained
    assert eval_threshold(shrunk, 0.1, 40, 0.25, previous=None) > second  # what it would have done unbounded
