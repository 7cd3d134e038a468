"""The per-app share of a dataset version and the bounded per-app/per-user counts (pure logic)."""

from __future__ import annotations

from workers.pairing.quality import app_of, apply_app_cap, contributions


def pair(i: int, *users: str) -> dict:
    return {"pair_id": f"p{i}", "users": list(users)}


def test_app_of_an_identity():
    assert app_of("shop:alice") == "shop"
    assert app_of("ip:0123abcd") is None and app_of("alice") is None and app_of("shop:") is None


def test_one_app_supplies_at_most_its_share_of_the_pairs_offered():
    pairs = [pair(i, f"shop:sybil-{i}") for i in range(200)] + [pair(1000 + i, f"blog:p{i}") for i in range(40)]
    pairs += [pair(2000 + i, f"ip:{i:08x}") for i in range(10)]  # no app: never app-capped
    result, limit = apply_app_cap(pairs, 0.3)
    assert limit == 75  # 30% of the 250 pairs offered
    kept_apps = [app_of(p["users"][0]) for p in result.kept]
    assert kept_apps.count("shop") == 75 and result.kept[:75] == pairs[:75]  # in order: the first ones
    assert kept_apps.count("blog") == 40 and kept_apps.count(None) == 10
    assert result.dropped[("app_cap", "over_cap")] == 200 - limit


def test_a_pair_another_app_also_stands_behind_is_kept_through_its_budget():
    pairs = [pair(i, "shop:a") for i in range(10)] + [pair(99, "shop:b", "blog:c")]
    result, _ = apply_app_cap(pairs, 0.5)
    assert "p99" in {p["pair_id"] for p in result.kept}


def test_fraction_one_keeps_everything():
    pairs = [pair(i, "shop:a") for i in range(5)]
    assert len(apply_app_cap(pairs, 1.0)[0].kept) == 5


def test_contributions_are_bounded():
    rows = [{"users": [f"app{i % 30}:u{i}"]} for i in range(300)]
    counts = contributions(rows, top=20)
    assert len(counts["apps"]) == 21 and counts["apps"]["(other)"] == 100
    assert sum(counts["users"].values()) == 300 and len(counts["users"]) == 21
