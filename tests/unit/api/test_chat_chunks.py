"""Streaming chunks for n > 1: vLLM merges the choices into one output when the reader lags behind."""

from types import SimpleNamespace

import orjson

from services.api.routes.chat import _chunk


def _out(*choices: tuple[int, str, str | None]) -> SimpleNamespace:
    return SimpleNamespace(
        outputs=[SimpleNamespace(index=i, text=t, token_ids=[0] * len(t), finish_reason=r) for i, t, r in choices]
    )


def _events(data: bytes) -> list[dict]:
    return [orjson.loads(e[len(b"data: ") :]) for e in data.split(b"\n\n") if e]


def test_merged_output_becomes_one_event_per_choice():
    texts, reasons, started = ["", ""], [None, None], [False, False]
    data, tokens = _chunk(_out((0, "ab", None), (1, "c", "stop")), {"id": "x"}, texts, reasons, started)
    events = _events(data)
    assert [len(e["choices"]) for e in events] == [1, 1]
    assert [e["choices"][0]["index"] for e in events] == [0, 1]
    assert [e["choices"][0]["delta"] for e in events] == [
        {"content": "ab", "role": "assistant"},
        {"content": "c", "role": "assistant"},
    ]
    assert events[1]["choices"][0]["finish_reason"] == "stop" and all(e["id"] == "x" for e in events)
    assert (texts, reasons, tokens) == (["ab", "c"], [None, "stop"], 3)

    data, _ = _chunk(_out((0, "d", "length")), {"id": "x"}, texts, reasons, started)
    (event,) = _events(data)
    assert event["choices"][0]["delta"] == {"content": "d"}  # the role comes only with a choice's first delta
    assert event["choices"][0]["finish_reason"] == "length" and texts == ["abd", "c"]


def test_output_with_no_choices_sends_nothing():
    assert _chunk(_out(), {"id": "x"}, [""], [None], [False]) == (b"", 0)
