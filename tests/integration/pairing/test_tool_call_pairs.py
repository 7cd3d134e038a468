"""Tool calls through the whole loop: the session's live API (tiny model, tool chat template, vLLM's hermes
parser; tests/conftest.py), votes over HTTP, the real pairs consumer on the real Redis, and a dataset version.
A like on a tool call and a dislike on a plain answer to the same prompt are one preference over tool calls,
exported in TRL's conversational format with the calls and the tools."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import orjson

from tests.conftest import LiveApi
from tests.support.tools import WEATHER
from workers.pairing import datasets
from workers.pairing import rules as pairing
from workers.pairing.consumer import FeedbackConsumer

NAMED = {"type": "function", "function": {"name": "get_weather"}}


def vote(live_api: LiveApi, feedback: dict, rating: str, user: str) -> None:
    body = {"completion_id": feedback["completion_id"], "token": feedback["token"], "rating": rating, "user": user}
    response = httpx.post(live_api.base_url + "/v1/feedback", json=body)
    assert response.status_code == 202, response.text


def exported_rows(folder: Path, name: str) -> list[dict]:
    return [orjson.loads(line) for line in (folder / name).read_bytes().splitlines() if line.strip()]


def test_a_liked_tool_call_and_a_disliked_plain_answer_are_one_exported_pair(
    openai_client, live_api: LiveApi, tmp_path: Path
):
    user = f"tools-{uuid.uuid4().hex[:6]}"
    messages = [{"role": "user", "content": f"Weather in Paris? Asked by {user}."}]
    called = openai_client.chat.completions.create(
        model="feedloop", messages=messages, tools=[WEATHER], tool_choice=NAMED, temperature=0, max_tokens=80, user=user
    )
    assert called.choices[0].message.tool_calls, called.choices[0].message
    [tool_call] = called.choices[0].message.tool_calls
    assert tool_call.function.name == "get_weather"
    # TRL's format has arguments as an object; the tiny model's may be other JSON (it says `false`): kept as text
    arguments = json.loads(tool_call.function.arguments)
    if not isinstance(arguments, dict):
        arguments = tool_call.function.arguments
    for seed in range(8):  # the same prompt and tools, answered in text (the tiny model may say nothing at once)
        plain = openai_client.chat.completions.create(
            model="feedloop",
            messages=messages,
            tools=[WEATHER],
            tool_choice="none",
            seed=seed,
            max_tokens=12,
            user=user,
        )
        if (plain.choices[0].message.content or "").strip():
            break
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content.strip()
    for reply in (called, plain):
        stored = orjson.loads(live_api.flush_interactions(reply.id) or b"null")
        assert stored["tools"][0]["function"]["name"] == "get_weather"
    assert [c["function"] for c in stored_calls(live_api, called.id)] == [tool_call.function.model_dump()]

    vote(live_api, called.model_extra["feedback"], "like", user)
    vote(live_api, plain.model_extra["feedback"], "dislike", user)
    FeedbackConsumer(live_api.redis, live_api.keys, live_api.settings, name=f"tools-{user}").consume(
        30, until_drained=True
    )

    pid = pairing.pair_id("same_prompt", called.id, plain.id)
    raw = live_api.redis.get(live_api.keys.pair(pid))
    assert raw is not None, "the like on a tool call and the dislike on a plain answer made no pair"
    pair = orjson.loads(raw)
    [chosen] = pair["chosen"]
    assert chosen["content"] == "" and [c["function"] for c in chosen["tool_calls"]] == [
        tool_call.function.model_dump()
    ]
    assert pair["rejected"] == [{"role": "assistant", "content": plain.choices[0].message.content}]

    settings = live_api.settings.model_copy(deep=True)
    settings.pairs.data_dir = tmp_path / "datasets"
    manifest = datasets.snapshot(live_api.redis, live_api.keys, settings)
    folder = Path(manifest["path"])
    [row] = [
        r for r in exported_rows(folder, "train.jsonl") + exported_rows(folder, "eval.jsonl") if r["pair_id"] == pid
    ]
    assert row["prompt"] == messages
    # TRL's conversational format: the calls on the assistant turn
    assert row["chosen"] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": chosen["tool_calls"][0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        }
    ]
    assert row["rejected"] == pair["rejected"]
    assert [tool["function"]["name"] for tool in row["tools"]] == ["get_weather"]
    assert row["tools"][0]["function"]["parameters"] == WEATHER["function"]["parameters"]
    # the unpaired export keeps the liked call as its completion too (the per-user cap may leave out the other)
    kto = [r for r in exported_rows(folder, "kto.jsonl") if r["prompt"] == messages and r["label"]]
    assert [(r["completion"], r["tools"]) for r in kto] == [(row["chosen"], row["tools"])]


def stored_calls(live_api: LiveApi, completion_id: str) -> list[dict]:
    return orjson.loads(live_api.redis.get(live_api.keys.interaction(completion_id)))["tool_calls"]


def test_two_answers_making_the_same_call_make_no_pair(openai_client, live_api: LiveApi):
    user = f"tools-{uuid.uuid4().hex[:6]}"
    messages = [{"role": "user", "content": f"Weather in Tokyo? Asked by {user}."}]
    replies = [
        openai_client.chat.completions.create(
            model="feedloop",
            messages=messages,
            tools=[WEATHER],
            tool_choice=NAMED,
            temperature=0,
            max_tokens=80,
            user=user,
        )
        for _ in range(2)
    ]
    first, second = (r.choices[0].message.tool_calls[0] for r in replies)
    assert first.id != second.id and first.function == second.function  # greedy: the same call, new ids
    for reply, rating in zip(replies, ("like", "dislike"), strict=True):
        assert live_api.flush_interactions(reply.id) is not None
        vote(live_api, reply.model_extra["feedback"], rating, user)
    FeedbackConsumer(live_api.redis, live_api.keys, live_api.settings, name=f"tools-{user}").consume(
        30, until_drained=True
    )
    pid = pairing.pair_id("same_prompt", replies[0].id, replies[1].id)
    assert not live_api.redis.exists(live_api.keys.pair(pid))
    assert live_api.redis.get(live_api.keys.pair_dropped(pid)) == b"drop:identical:chosen_equals_rejected"
