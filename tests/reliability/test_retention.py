"""Retention with nothing lost, on a real redis-server: the feedback stream is trimmed only up to what every
consumer group has acknowledged, and the dead-letter stream keeps its newest entries up to a cap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import orjson

from services.core import metrics
from services.core.config import Settings
from services.core.keys import Keys
from tests.support.redis_server import RedisServer
from tests.support.stream_data import two_answer_prompts
from workers.pairing.consumer import FeedbackConsumer


def settings_for(server: RedisServer, keys: Keys, tmp_path: Path, **pairs: object) -> Settings:
    return Settings(
        redis_url=server.url,
        redis_prefix=keys.prefix,
        engine={"model": str(tmp_path / "no-model")},
        pairs={"strategies": ["same_prompt"], "batch_size": 50, "block_ms": 50, "claim_idle_ms": 60_000, **pairs},
    )


def test_stream_is_trimmed_only_up_to_what_every_group_acknowledged(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = redis_server()
    client = server.client()
    keys = Keys("faults-trim")
    stream = keys.feedback_stream
    consumer = FeedbackConsumer(client, keys, settings_for(server, keys, tmp_path), name="pairing-1")

    sent = 200
    two_answer_prompts(client, keys, 0, sent // 2)
    ids = [entry_id for entry_id, _ in client.xrange(stream)]
    # a second consumer group (another reader of the stream) is behind: it read 50 entries and acked 30
    client.xgroup_create(stream, "audit", id="0")
    read = client.xreadgroup("audit", "auditor", {stream: ">"}, count=50)[0][1]
    client.xack(stream, "audit", *[entry_id for entry_id, _ in read[:30]])

    trimmed_metric = metrics.FEEDBACK_STREAM_TRIMMED
    before = trimmed_metric._value.get()
    report = consumer.consume(20, until_drained=True)
    assert report.processed == sent
    kept = [entry_id for entry_id, _ in client.xrange(stream)]
    # everything from the audit group's oldest unacknowledged entry on is still there
    assert kept == ids[30:]
    assert trimmed_metric._value.get() - before == 30
    counts = {"sent": sent, "consumed": report.processed, "trimmed": 30, "kept": len(kept), "unconsumed_lost": 0}
    assert counts["trimmed"] + counts["kept"] == sent

    # the audit group catches up: the next consuming task trims the rest
    rest = client.xreadgroup("audit", "auditor", {stream: ">"}, count=1000)[0][1]
    client.xack(stream, "audit", *[entry_id for entry_id, _ in read[30:]], *[entry_id for entry_id, _ in rest])
    consumer.consume(1, until_drained=True)
    assert client.xlen(stream) == 0

    # new entries after a full trim are consumed as usual, and nothing consumed twice
    expected = two_answer_prompts(client, keys, 1000, 1010)
    report = consumer.consume(20, until_drained=True)
    assert report.processed == 20 and expected <= {p.decode() for p in client.zrange(keys.pairs_index, 0, -1)}
    assert int(client.get(keys.pairs_seq)) == sent // 2 + 10  # every pair once


def test_stream_is_left_alone_when_trimming_is_off(redis_server: Callable[..., RedisServer], tmp_path: Path) -> None:
    server = redis_server()
    client = server.client()
    keys = Keys("faults-notrim")
    settings = settings_for(server, keys, tmp_path, trim_acknowledged=False)
    two_answer_prompts(client, keys, 0, 20)
    FeedbackConsumer(client, keys, settings, name="c").consume(20, until_drained=True)
    assert client.xlen(keys.feedback_stream) == 40


def test_dead_letter_stream_is_capped_newest_kept(redis_server: Callable[..., RedisServer], tmp_path: Path) -> None:
    server = redis_server()
    client = server.client()
    keys = Keys("faults-dead")
    cap, sent = 10, 35
    consumer = FeedbackConsumer(client, keys, settings_for(server, keys, tmp_path, dead_letter_maxlen=cap), name="c")
    for i in range(sent):
        client.xadd(keys.feedback_stream, {b"event": orjson.dumps({"not": "a feedback event", "n": i})})
    trimmed_before = metrics.FEEDBACK_DEAD_LETTERS_TRIMMED._value.get()
    report = consumer.consume(20, until_drained=True)
    assert report.dead_lettered == sent
    letters = client.xrange(keys.feedback_dead_letter)
    kept = [orjson.loads(fields[b"event"])["n"] for _, fields in letters]
    trimmed = metrics.FEEDBACK_DEAD_LETTERS_TRIMMED._value.get() - trimmed_before
    counts = {"sent": sent, "dead_lettered": report.dead_lettered, "kept": len(kept), "trimmed": int(trimmed)}
    assert counts == {"sent": sent, "dead_lettered": sent, "kept": cap, "trimmed": sent - cap}, counts
    assert kept == list(range(sent - cap, sent))  # the newest ones
    assert int(client.hget(keys.pairs_stats, "dead_letter")) == sent  # every one counted before trimming


def test_pairing_state_older_than_retention_is_compacted_and_recent_pairing_still_works(
    redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    import time

    from tests.support.feedback_events import entry, feedback_event
    from workers.pairing import datasets
    from workers.pairing.retention import compact

    server = redis_server()
    client = server.client()
    keys = Keys("faults-compact")
    day = 24 * 3600
    settings = settings_for(server, keys, tmp_path, retention_s=30 * day, data_dir=tmp_path / "datasets")
    consumer = FeedbackConsumer(client, keys, settings, name="c")
    now = time.time()

    def prompts(first: int, last: int, at: float) -> set[str]:
        for i in range(first, last):
            prompt = f"Retention question {i}?"
            for cid, rating, user in ((f"L{i}", "like", f"a{i}"), (f"D{i}", "dislike", f"b{i}")):
                event = feedback_event(cid, rating, user, prompt=prompt, response=f"{cid}.", created_at=at + i)
                client.xadd(keys.feedback_stream, entry(event))
        consumer.consume(20, until_drained=True)
        return {pairing_id(i) for i in range(first, last)}

    old = prompts(0, 40, now - 60 * day)  # voted 60 days ago: past the 30-day retention
    recent = prompts(100, 130, now - 1 * day)
    before = {"keys": client.dbsize(), "pairs": client.zcard(keys.pairs_index)}
    removed = compact(client, keys, settings, now=now)
    after = {"keys": client.dbsize(), "pairs": client.zcard(keys.pairs_index)}
    assert removed == {"completions": 80, "pairs": 40}
    assert (before["pairs"], after["pairs"]) == (70, 30)
    assert after["keys"] < before["keys"] - 40 - 80  # pair keys and per-completion keys are gone
    stored = {p.decode() for p in client.zrange(keys.pairs_index, 0, -1)}
    assert stored == recent and not stored & old
    for i in (0, 39):
        assert not client.exists(keys.pairing_completion(f"L{i}"), keys.pairing_votes(f"D{i}"))
    assert compact(client, keys, settings, now=now) == {"completions": 0, "pairs": 0}  # nothing twice

    # what future pairing needs is still there: a new dislike on a recent prompt pairs with its liked answer
    event = feedback_event("D100b", "dislike", "c100", prompt="Retention question 100?", response="other.")
    client.xadd(keys.feedback_stream, entry(event))
    consumer.consume(20, until_drained=True)
    assert pairing_id_for("L100", "D100b") in {p.decode() for p in client.zrange(keys.pairs_index, 0, -1)}
    manifest = datasets.snapshot(client, keys, settings)  # and a dataset holds exactly the kept pairs
    assert manifest["counts"]["stored"] == len(recent) + 1


def pairing_id(i: int) -> str:
    return pairing_id_for(f"L{i}", f"D{i}")


def pairing_id_for(chosen: str, rejected: str) -> str:
    from workers.pairing import rules

    return rules.pair_id("same_prompt", chosen, rejected)
