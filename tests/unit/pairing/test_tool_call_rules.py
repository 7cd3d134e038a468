"""Tool-call answers in feedback and pairs: the event keeps them, pairing compares calls (not ids or raw text),
scrubbing keeps the arguments valid JSON, and exports are TRL's conversational format with tool_calls and tools."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.feedback.events import MalformedEvent, parse_event
from tests.support.feedback_events import entry, feedback_event
from tests.support.tools import WEATHER
from workers.pairing import quality
from workers.pairing import rules as pairing
from workers.pairing.datasets import dpo_row, trl_messages
from workers.pairing.exports import ExportError, load_kto_rows, load_preference_rows
from workers.pairing.pii import scrub_pair
from workers.pairing.rules import RatedResponse
from workers.training.trainer import training_dataset


def call(name: str = "get_weather", arguments: str = '{"city": "Paris"}', call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_event(cid: str, rating: str, calls: list[dict[str, Any]] | None, **kw: Any) -> dict[str, Any]:
    """An event whose interaction came from a request with tools, as services/api/routes/chat.py logs it."""
    raw = "".join(f"<tool_call>{c['function']['arguments']}</tool_call>" for c in calls or []) or "It is sunny."
    event = feedback_event(cid, rating, prompt="Weather in Paris?", response=raw, **kw)
    event["interaction"].update(tools=[WEATHER], tool_calls=calls)
    if calls:
        event["interaction"]["content"] = ""
    return event


# --- the event ------------------------------------------------------------------------------------------


def test_event_keeps_the_answer_tool_calls_and_the_prompt_tools():
    event = parse_event(entry(tool_event("c1", "like", [call()])))
    assert event.tools == [WEATHER]
    assert event.tool_calls == [call()]
    assert event.answer == {"role": "assistant", "content": "", "tool_calls": [call()]}
    plain = parse_event(entry(tool_event("c2", "dislike", None)))
    assert plain.tool_calls is None and plain.content is None and plain.tools == [WEATHER]
    assert plain.answer == {"role": "assistant", "content": "It is sunny."}
    # an event from before tools existed (or a request without them) parses as it always did
    old = parse_event(entry(feedback_event("c3", "like")))
    assert old.tools is None and old.tool_calls is None and old.answer["content"] == "Two plus two is four."


def test_event_keeps_tool_turns_of_the_conversation():
    event = tool_event("c1", "like", None)
    event["interaction"]["messages"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call()]},
        {"role": "tool", "content": '{"sky": "clear"}', "tool_call_id": "call_1"},
    ]
    parsed = parse_event(entry(event))
    assert parsed.messages == event["interaction"]["messages"]


@pytest.mark.parametrize(
    ("where", "value", "problem"),
    [
        ("tool_calls", [{"type": "function", "function": {"arguments": "{}"}}], "interaction.tool_calls"),
        ("tool_calls", "get_weather", "interaction.tool_calls"),
        ("tools", {"type": "function"}, "interaction.tools"),
        ("content", 3, "interaction.content"),
        ("messages", [{"role": "user", "content": "hi", "tool_calls": [call()]}], "tool_calls only on assistant"),
    ],
)
def test_malformed_tool_fields_are_dead_lettered_with_a_reason(where: str, value: Any, problem: str):
    event = tool_event("c1", "like", [call()])
    event["interaction"][where] = value
    with pytest.raises(MalformedEvent, match=problem):
        parse_event(entry(event))


# --- prompt identity ------------------------------------------------------------------------------------


def test_prompt_hash_of_a_plain_conversation_is_unchanged():
    messages = [{"role": "system", "content": "Be  brief."}, {"role": "user", "content": "Hi\n there"}]
    before = hashlib.sha256(orjson.dumps([["system", "Be brief."], ["user", "Hi there"]])).hexdigest()[:32]
    assert pairing.prompt_hash(messages) == before == pairing.prompt_hash(messages, None)


def test_prompt_hash_covers_tools_and_earlier_calls_but_not_call_ids():
    user = [{"role": "user", "content": "Weather in Paris?"}]
    assert pairing.prompt_hash(user, [WEATHER]) != pairing.prompt_hash(user)
    other_tool = copy.deepcopy(WEATHER)
    other_tool["function"]["name"] = "get_forecast"
    assert pairing.prompt_hash(user, [WEATHER]) != pairing.prompt_hash(user, [other_tool])

    def turn(c: dict[str, Any]) -> list[dict[str, Any]]:
        return [*user, {"role": "assistant", "content": "", "tool_calls": [c]}, {"role": "user", "content": "ok"}]

    same = pairing.prompt_hash(turn(call(call_id="a")), [WEATHER])
    assert same == pairing.prompt_hash(turn(call(call_id="b", arguments='{ "city":"Paris" }')), [WEATHER])
    assert same != pairing.prompt_hash(turn(call(arguments='{"city": "Rome"}')), [WEATHER])


# --- pairs ----------------------------------------------------------------------------------------------


def test_a_liked_tool_call_against_a_disliked_plain_answer_is_a_pair_over_tool_calls():
    liked = parse_event(entry(tool_event("liked", "like", [call()])))
    disliked = RatedResponse("plain", "It is sunny.", None, ["f2"], ["u2"])
    phash = pairing.prompt_hash(liked.messages, liked.tools)
    pairs = pairing.pairs_for_vote(
        liked,
        label="like",
        own=RatedResponse("liked", liked.response, None, [liked.feedback_id], ["u1"], liked.tool_calls, liked.content),
        counterparts=[(disliked, liked.messages)],
        strategies=["same_prompt"],
        phash=phash,
    )
    [pair] = pairs
    assert pair["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [call()]}]
    assert pair["rejected"] == [{"role": "assistant", "content": "It is sunny."}]
    assert pair["tools"] == [WEATHER] and pair["prompt_hash"] == phash
    assert quality.check_pair(pair, lambda messages: True) is None  # an answer that only calls is not empty


def test_a_correction_of_a_tool_call_rejects_the_calls():
    event = parse_event(entry(tool_event("c1", "dislike", [call()], correction="Ask me for the city first.")))
    pair = pairing.correction_pair(event, phash="p")
    assert pair is not None
    assert pair["chosen"] == [{"role": "assistant", "content": "Ask me for the city first."}]
    assert pair["rejected"][0]["tool_calls"] == [call()] and pair["tools"] == [WEATHER]


def _pair(chosen: dict[str, Any], rejected: dict[str, Any]) -> dict[str, Any]:
    return pairing.make_pair(
        "same_prompt",
        pairing.pair_id("same_prompt", json.dumps(chosen), json.dumps(rejected)),
        [{"role": "user", "content": "Weather in Paris?"}],
        chosen,
        rejected,
        feedback_ids=["f1"],
        completion_ids=["a", "b"],
        users=["u1"],
        adapter=None,
        created_at=1.0,
        phash="p",
        tools=[WEATHER],
    )


def _calls(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": "", "tool_calls": list(calls)}


def test_equal_calls_are_identical_answers_whatever_their_ids_and_json_spelling():
    a = _calls(call(arguments='{"city": "Paris", "unit": "C"}', call_id="chatcmpl-tool-1"))
    b = _calls(call(arguments='{"unit":"C",  "city":"Paris"}', call_id="chatcmpl-tool-2"))
    assert quality.check_pair(_pair(a, b), lambda m: True) == ("identical", "chosen_equals_rejected")


@pytest.mark.parametrize(
    "other",
    [
        _calls(call(arguments='{"city": "Rome"}')),  # other arguments
        _calls(call(name="get_forecast")),  # another function
        _calls(call(), call(arguments='{"city": "Rome"}')),  # one more call
        {"role": "assistant", "content": ""},  # no call at all: empty
    ],
)
def test_distinct_calls_are_distinct_answers(other: dict[str, Any]):
    verdict = quality.check_pair(_pair(_calls(call()), other), lambda m: True)
    assert verdict == (("empty", "rejected") if "tool_calls" not in other else None)


def test_pairs_differing_only_in_their_calls_are_not_duplicates():
    first = _pair(_calls(call()), {"role": "assistant", "content": "It is sunny."})
    second = _pair(_calls(call(arguments='{"city": "Rome"}')), {"role": "assistant", "content": "It is sunny."})
    again = _pair(_calls(call(call_id="other")), {"role": "assistant", "content": "It is sunny."})
    kept = quality.dedupe([first, second, again], threshold=1.01)
    assert [p["pair_id"] for p in kept.kept] == [first["pair_id"], second["pair_id"]]
    assert kept.dropped == {("duplicate", "exact"): 1}


def test_scrubbing_masks_pii_inside_arguments_and_keeps_them_json():
    pair = _pair(
        _calls(call(name="send_mail", arguments='{"to": "bob@example.com", "copies": 2}')),
        {"role": "assistant", "content": "Mail bob@example.com yourself."},
    )
    pair["prompt"].append({"role": "tool", "content": "sent to bob@example.com", "tool_call_id": "call_1"})
    counts = scrub_pair(pair)
    assert counts == {"email": 3}
    [scrubbed] = pair["chosen"][0]["tool_calls"]
    assert json.loads(scrubbed["function"]["arguments"]) == {"to": "[EMAIL]", "copies": 2}
    assert scrubbed["id"] == "call_1" and scrubbed["function"]["name"] == "send_mail"
    assert pair["prompt"][-1] == {"role": "tool", "content": "sent to [EMAIL]", "tool_call_id": "call_1"}


def test_tool_definitions_count_toward_the_length_limit():
    pair = _pair(_calls(call()), {"role": "assistant", "content": "It is sunny."})
    counter = quality.TokenCounter(None)  # the bytes/3 heuristic
    limit = counter.count([*pair["prompt"], *pair["chosen"]]) + 2
    assert quality.check_pair(copy.deepcopy({**pair, "tools": None}), lambda m: counter.fits(m, limit)) is None
    assert quality.check_pair(pair, lambda m: counter.fits(m, limit)) == ("length", "chosen_too_long")


# --- exports --------------------------------------------------------------------------------------------


def test_dpo_rows_are_trl_conversational_rows_with_tool_calls_and_tools(tmp_path: Path):
    pair = _pair(_calls(call()), {"role": "assistant", "content": "It is sunny."})
    pair["prompt"] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call(arguments="not json")]},
        {"role": "tool", "content": "error", "tool_call_id": "call_1"},
    ]
    row = dpo_row(pair)
    # TRL (and transformers' chat templates) take arguments as an object; vLLM converts them the same way
    assert row["chosen"] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        }
    ]
    assert row["prompt"][1]["tool_calls"][0]["function"]["arguments"] == "not json"  # left as it was
    assert row["prompt"][2] == {"role": "tool", "content": "error", "tool_call_id": "call_1"}
    assert row["rejected"] == [{"role": "assistant", "content": "It is sunny."}] and row["tools"] == [WEATHER]
    assert pair["chosen"][0]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # not mutated

    plain = dpo_row({**pair, "prompt": pair["prompt"][:1], "chosen": [{"role": "assistant", "content": "x"}]})
    assert "tools" in plain  # the prompt was asked with tools
    without = dpo_row(
        {**pair, "tools": None, "chosen": [{"role": "assistant", "content": "x"}], "prompt": pair["prompt"][:1]}
    )
    assert set(without) == {"prompt", "chosen", "rejected", "pair_id"}

    path = tmp_path / "train.jsonl"
    path.write_bytes(orjson.dumps(row) + b"\n" + orjson.dumps(without) + b"\n")
    loaded = load_preference_rows(path)
    assert loaded[0] == {key: row[key] for key in ("prompt", "chosen", "rejected", "tools")}
    assert loaded[1] == {key: without[key] for key in ("prompt", "chosen", "rejected")}


def test_trl_messages_leaves_plain_conversations_alone():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert trl_messages(messages) is messages


def test_kto_rows_keep_tools(tmp_path: Path):
    path = tmp_path / "kto.jsonl"
    row = {"prompt": [{"role": "user", "content": "Weather?"}], "completion": [_calls(call())], "label": True}
    path.write_bytes(orjson.dumps({**row, "tools": [WEATHER]}) + b"\n")
    assert load_kto_rows(path) == [{**row, "tools": [WEATHER]}]
    path.write_bytes(orjson.dumps({**row, "tools": {"bad": 1}}) + b"\n")
    with pytest.raises(ExportError, match="tools must be a list"):
        load_kto_rows(path)


def test_training_dataset_gives_the_chat_template_each_message_as_exported():
    tool_row = dpo_row(_pair(_calls(call()), {"role": "assistant", "content": "It is sunny."}))
    del tool_row["pair_id"]
    other = dpo_row(
        _pair(_calls(call(name="get_time", arguments='{"zone": {"name": "UTC", "offset": 0}}')), _calls(call()))
    )
    del other["pair_id"]
    plain = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    dataset = training_dataset([plain, tool_row, other])
    # no key of one message leaks into another (Arrow's struct inference would add "tool_calls": None to
    # every plain turn, and merge argument fields of different functions)
    assert dataset[0] == {**plain, "tools": None}
    assert dataset[1] == tool_row
    assert dataset[2]["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"zone": {"name": "UTC", "offset": 0}}
    assert training_dataset([plain]).column_names == ["prompt", "chosen", "rejected"]  # plain rows: as before
