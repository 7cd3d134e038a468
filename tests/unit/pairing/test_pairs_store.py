"""Argument building and reply parsing of the batched pairing scripts (no Redis)."""

from __future__ import annotations

from redis import Redis

from services.core.keys import Keys
from workers.pairing.store import (
    PairsStore,
    RecordBatch,
    StoredVote,
    VoteBatch,
    VoteOutcome,
    parse_vote,
    ratings,
    supporters,
    tally,
    vote_value,
)


def test_vote_batch_sends_keys_and_record_once_per_completion_and_prompt():
    keys = Keys("t")
    votes = VoteBatch(keys)
    first = votes.add_slot("c1", "ph", b'{"completion_id":"c1"}')
    votes.add(first, "u1", vote_value(1.5, "f1", "like", "", "u1"))
    assert votes.slots.get(("c1", "ph")) == first == 1
    votes.add(first, "u2", vote_value(2.0, "f2", "dislike", "abc", "u2"))
    second = votes.add_slot("c2", "ph", b"")  # record known to be stored: not sent again
    votes.add(second, "u1", vote_value(3.0, "f3", "like", "", "u1"))

    assert len(votes) == 3
    assert votes.keys == [
        keys.labeled_completions,
        *(keys.pairing_votes("c1"), keys.prompt_group("ph"), keys.prompt_liked("ph")),
        *(keys.prompt_disliked("ph"), keys.pairing_completion("c1")),
        *(keys.pairing_votes("c2"), keys.prompt_group("ph"), keys.prompt_liked("ph")),
        *(keys.prompt_disliked("ph"), keys.pairing_completion("c2")),
    ]
    assert votes.slot_args == ["c1", b'{"completion_id":"c1"}', "c2", b""]
    assert votes.event_args[3:6] == [1, "u2", "2.0|f2|dislike|abc|u2"]


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


def test_a_stored_vote_names_its_voter_whatever_field_holds_it():
    anonymous = vote_value(2.0, "f2", "like", "", "ip:ab|cd")  # only the voter, last, may hold "|"
    assert parse_vote("~anonymous", anonymous) == StoredVote(2.0, "f2", "like", "", "ip:ab|cd")
    # a value written before the voter was kept in it: its field is the voter
    assert parse_vote(b"u1", b"1.0|f1|dislike|h") == StoredVote(1.0, "f1", "dislike", "h", "u1")


def test_tally_supporters_and_ratings_read_voters_from_the_values():
    votes = [
        b"~anonymous",
        vote_value(3.0, "f3", "like", "", "ip:b").encode(),
        b"u1",
        b"1.0|f1|like|",
        b"u2",
        vote_value(2.0, "f2", "dislike", "", "u2").encode(),
        b"u3",
        vote_value(4.0, "f4", "withdrawn", "", "u3").encode(),  # rates nothing (the voter rule read it as a dislike)
    ]
    assert tally(votes) == ("like", ["f1", "f3"], ["u1", "ip:b"])
    assert supporters(votes, "dislike") == (["f2"], ["u2"])
    assert sorted(ratings(votes)) == [("ip:b", "like"), ("u1", "like"), ("u2", "dislike")]
