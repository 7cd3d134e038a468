"""Quality filters on hand-made pairs: PII, lengths, duplicates, the per-user cap, and their counters."""

from __future__ import annotations

from collections import Counter

import pytest

from workers.pairing import pii, quality
from workers.pairing.rules import make_pair, pair_id


def pair(
    chosen: str = "Paris is the capital of France.",
    rejected: str = "Lyon is the capital of France.",
    prompt: str = "What is the capital of France?",
    users=("u1",),
    pid: str | None = None,
) -> dict:
    return make_pair(
        "same_prompt",
        pid or pair_id("same_prompt", prompt, chosen, rejected, *users),
        [{"role": "user", "content": prompt}],
        chosen,
        rejected,
        feedback_ids=["f"],
        completion_ids=["c1", "c2"],
        users=users,
        adapter=None,
        created_at=1.0,
        phash="p",
    )


# --- PII --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked", "kind"),
    [
        ("mail me: jane.doe+x@example.co.uk please", "mail me: [EMAIL] please", "email"),
        ("call +1 (555) 123-4567 now", "call [PHONE] now", "phone"),
        ("call 555-123-4567", "call [PHONE]", "phone"),
        ("ring 020 7946 0958 today", "ring [PHONE] today", "phone"),
        ("card 4111 1111 1111 1111 ok", "card [CARD] ok", "card"),
        ("card 5500-0000-0000-0004", "card [CARD]", "card"),
        ("server 192.168.1.20.", "server [IP].", "ip"),
        ("v6 2001:db8::8a2e:370:7334 here", "v6 [IP] here", "ip"),
        ("v6 fe80::1", "v6 [IP]", "ip"),
    ],
)
def test_scrub_pii_masks_and_counts(text: str, masked: str, kind: str):
    out, counts = pii.scrub_pii(text)
    assert out == masked
    assert counts == Counter({kind: 1})


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails the Luhn check",
        "released on 2024-01-15 at 12:30:45",
        "version 1.2.3 and 10.5 percent",
        "the answer is 42, or 1234",
        "no personal data here at all",
        "ratio 3:2 and time 10:15",
    ],
)
def test_scrub_pii_leaves_ordinary_text_alone(text: str):
    out, counts = pii.scrub_pii(text)
    assert out == text and not counts


def test_luhn():
    assert pii.luhn_valid("4111111111111111")
    assert not pii.luhn_valid("4111111111111112")


def test_scrub_pair_covers_prompt_and_both_answers():
    p = pair(chosen="Write to a@b.io", rejected="Or 10.0.0.1", prompt="My card is 4111111111111111")
    counts = pii.scrub_pair(p)
    assert counts == Counter({"email": 1, "ip": 1, "card": 1})
    assert p["prompt"][0]["content"] == "My card is [CARD]"
    assert p["chosen"][0]["content"] == "Write to [EMAIL]" and p["rejected"][0]["content"] == "Or [IP]"


# --- per-pair checks --------------------------------------------------------------------------------------


def always_fits(messages) -> bool:
    return True


@pytest.mark.parametrize(
    ("kwargs", "drop"),
    [
        ({"chosen": "  "}, ("empty", "chosen")),
        ({"rejected": ""}, ("empty", "rejected")),
        ({"prompt": " \n"}, ("empty", "prompt")),
        ({"chosen": "Same  answer.", "rejected": "Same answer. "}, ("identical", "chosen_equals_rejected")),
    ],
)
def test_check_pair_drops_empty_and_identical(kwargs: dict, drop: tuple[str, str]):
    assert quality.check_pair(pair(**kwargs), always_fits) == drop


def test_check_pair_keeps_a_good_pair():
    assert quality.check_pair(pair(), always_fits) is None


def test_check_pair_drops_over_long_texts_with_the_fallback_counter():
    counter = quality.TokenCounter("/nonexistent/model")  # cannot load: bytes/3 heuristic

    def fits(messages) -> bool:
        return counter.fits(messages, 64)

    assert quality.check_pair(pair(), fits) is None
    assert quality.check_pair(pair(chosen="word " * 200), fits) == ("length", "chosen_too_long")
    assert quality.check_pair(pair(rejected="word " * 200), fits) == ("length", "rejected_too_long")
    assert counter.tokenizer is None


def test_token_counter_uses_the_served_tokenizer(tiny_model_dir):
    counter = quality.TokenCounter(str(tiny_model_dir))
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    n = counter.count(messages)
    expected = len(counter.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    assert n == expected and 0 < n < 40
    assert counter.fits(messages, n) and not counter.fits([{"role": "user", "content": "zq" * 400}], 100)


def test_token_counter_renders_with_the_served_chat_template(tiny_model_dir, tmp_path):
    """engine.chat_template replaces the tokenizer's own for serving, training and the gate: the length check
    counts the prompt serving renders (here a template that adds a long system message), not the tokenizer's."""
    from services.core.config import Settings

    template = tmp_path / "long-system.jinja"
    template.write_text(
        "{{ '<|system|>' + 'You answer questions about the weather in great and careful detail. ' * 8 }}"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "Hello! How can I help you today?"}]
    plain = quality.TokenCounter(str(tiny_model_dir))
    served = quality.TokenCounter.for_settings(
        Settings(engine={"model": str(tiny_model_dir), "chat_template": str(template)})
    )
    rendered = served.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert served.count(messages) == len(rendered) > plain.count(messages) + 40
    assert plain.fits(messages, plain.count(messages)) and not served.fits(messages, plain.count(messages))


def test_token_counter_falls_back_when_the_chat_template_is_missing(tiny_model_dir, tmp_path):
    counter = quality.TokenCounter(str(tiny_model_dir), str(tmp_path / "missing.jinja"))
    assert counter.tokenizer is None  # logged; the bytes/3 heuristic counts instead of the wrong template
    assert counter.count([{"role": "user", "content": "abc" * 30}]) > 0


# --- duplicates -------------------------------------------------------------------------------------------


def test_dedupe_drops_exact_and_near_duplicates_keeping_the_first():
    text = "The capital of France is Paris, a city on the Seine with many museums, parks and old bridges."
    base = pair(chosen=text, pid="p1")
    exact = pair(chosen=text.replace(" is ", " is  "), pid="p2")  # differs only in whitespace
    near = pair(chosen=text.replace("bridges.", "bridges!"), pid="p3")
    different = pair(chosen="Tokyo is the capital of Japan and its largest city by far.", pid="p4")
    result = quality.dedupe([base, exact, near, different], threshold=0.9)
    assert [p["pair_id"] for p in result.kept] == ["p1", "p4"]
    assert result.dropped == Counter({("duplicate", "exact"): 1, ("duplicate", "near"): 1})
    assert result.dropped_ids == {"p2": ("duplicate", "exact"), "p3": ("duplicate", "near")}
    sim = quality.jaccard(quality.shingles(quality.pair_text(base)), quality.shingles(quality.pair_text(near)))
    assert 0.9 <= sim < 1.0


def test_dedupe_threshold_controls_near_duplicates():
    a = pair(chosen="one two three four five six seven eight nine ten", pid="a")
    b = pair(chosen="one two three four five six seven eight nine eleven", pid="b")
    sim = quality.jaccard(quality.shingles(quality.pair_text(a)), quality.shingles(quality.pair_text(b)))
    assert 0.5 < sim < 1.0
    assert len(quality.dedupe([a, b], threshold=sim - 0.01).kept) == 1
    assert len(quality.dedupe([a, b], threshold=sim + 0.01).kept) == 2


def test_dedupe_is_deterministic_at_scale():
    pairs = [pair(chosen=f"Answer number {i} is about topic {i % 7}.", pid=f"p{i}") for i in range(300)]
    first = quality.dedupe(pairs, 0.9)
    second = quality.dedupe(pairs, 0.9)
    assert [p["pair_id"] for p in first.kept] == [p["pair_id"] for p in second.kept]


# --- per-user cap -----------------------------------------------------------------------------------------


def test_user_cap_limit():
    assert quality.user_cap_limit(1000, 0.05, 50) == 50
    assert quality.user_cap_limit(200, 0.05, 50) == 10
    assert quality.user_cap_limit(10, 0.05, 50) == 1  # never zero


def test_user_cap_limits_one_identity_and_keeps_shared_pairs():
    flood = [pair(chosen=f"bad {i}", users=("mallory",), pid=f"m{i}") for i in range(30)]
    honest = [pair(chosen=f"good {i}", users=(f"user{i}",), pid=f"h{i}") for i in range(70)]
    shared = [pair(chosen="shared", users=("mallory", "alice"), pid="s")]
    result, limit = quality.apply_user_cap(flood + honest + shared, fraction=0.05, cap_max=50)
    assert limit == 5
    kept = {p["pair_id"] for p in result.kept}
    assert {f"m{i}" for i in range(5)} <= kept and not kept & {f"m{i}" for i in range(5, 30)}
    assert {f"h{i}" for i in range(70)} <= kept
    assert "s" in kept  # alice still has budget
    assert result.dropped == Counter({("user_cap", "over_cap"): 25})


# --- per-answer cap ---------------------------------------------------------------------------------------


def test_answer_cap_keeps_one_like_in_at_most_limit_same_prompt_pairs():
    def same_prompt(pid: str, liked: str, disliked: str) -> dict:
        p = pair(chosen=liked, rejected=disliked, pid=pid)
        return {**p, "completion_ids": [liked, disliked]}

    misclick = [same_prompt(f"m{i}", "like-x", f"dislike-{i}") for i in range(4)]
    other = [same_prompt("o", "like-y", "dislike-0")]
    correction = {**pair(pid="c"), "strategy": "correction", "completion_ids": ["like-x"]}
    result = quality.apply_answer_cap([*misclick, *other, correction], limit=1)
    assert [p["pair_id"] for p in result.kept] == ["m0", "c"]  # dislike-0 is used up by m0; corrections not capped
    assert result.dropped == Counter({("answer_cap", "over_cap"): 4})
    two = quality.apply_answer_cap([*misclick, *other], limit=2)
    assert [p["pair_id"] for p in two.kept] == ["m0", "m1", "o"]
    assert quality.apply_answer_cap(misclick, limit=0).kept == misclick


# --- counters ---------------------------------------------------------------------------------------------


def test_stats_round_trip_through_the_hash_fields():
    raw = {
        quality.created_field("same_prompt").encode(): b"7",
        quality.drop_field("duplicate", "near").encode(): b"2",
        quality.pii_field("email").encode(): b"3",
        b"dead_letter": b"1",
    }
    stats = quality.PairStats.from_hash(raw)
    assert stats.created == {"same_prompt": 7}
    assert stats.dropped == {("duplicate", "near"): 2}
    assert stats.pii == {"email": 3}
