"""Argument building and reply parsing of the batched pairing scripts (no Redis)."""

from __future__ import annotations

from redis import Redis

from services.core.keys import Keys
from workers.pairing.store import PairsStore, RecordBatch, VoteBatch, VoteOutcome, vote_value


def test_vote_batch_sends_keys_and_record_once_per_completion_and_prompt():
    keys = Keys("t")
    votes = VoteBatch(keys)
    first = votes.add_slot("c1", "ph", b'{"completion_id":"c1"}')
    votes.add(first, "u1", vote_value(1.5, "f1", "like", ""))
    assert votes.slots.get(("c1", "ph")) == first == 1
    votes.add(first, "u2", vote_value(2.0, "f2", "dislike", "abc"))
    second = votes.add_slot("c2", "ph", b"")  # record known to be stored: not sent again
    votes.add(second, "u1", vote_value(3.0, "f3", "like", ""))

    assert len(votes) == 3
    assert votes.keys == [
        keys.labeled_completions,
        *(keys.pairing_votes("c1"), keys.prompt_group("ph"), keys.prompt_liked("ph")),
        *(keys.prompt_disliked("ph"), keys.pairing_completion("c1")),
        *(keys.pairing_votes("c2"), keys.prompt_group("ph"), keys.prompt_liked("ph")),
        *(keys.prompt_disliked("ph"), keys.pairing_completion("c2")),
    ]
    assert votes.slot_args == ["c1", b'{"completion_id":"c1"}', "c2", b""]
    assert votes.event_args[3:6] == [1, "u2", "2.0|f2|dislike|abc"]


def test_vote_outcome_reads_a_bare_label_or_the_full_reply():
    assert VoteOutcome.parse(b"like") == VoteOutcome("like", [], [])
    assert VoteOutcome.parse(b"") == VoteOutcome(None, [], [])
    full = VoteOutcome.parse([b"dislike", [b"c7", b"c9"], [b"u1", b"1.0|f|dislike|"]])
    assert full == VoteOutcome("dislike", ["c7", "c9"], [b"u1", b"1.0|f|dislike|"])


def test_record_batch_lays_out_each_record_with_its_counters():
    keys = Keys("t")
    store = PairsStore(Redis(), keys)  # builds arguments only: never connects
    records = RecordBatch()
    store.add_pair(records, {"pair_id": "p1"}, {"created:same_prompt": 1, "pii:email": 2})
    store.add_drop(records, "p2", "drop:empty:chosen", {"drop:empty:chosen": 1})
    assert records.keys == [keys.pair("p1"), keys.pair_dropped("p2")]
    assert records.args == [
        *("p1", b'{"pair_id":"p1"}', "1", 2, "created:same_prompt", 1, "pii:email", 2),
        *("p2", "drop:empty:chosen", "0", 1, "drop:empty:chosen", 1),
    ]
