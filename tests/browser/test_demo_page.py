"""The demo chat page at /: chat with the model, dislike the streamed answer, suggest a better one, and
find that feedback in Redis."""

from __future__ import annotations

from typing import Any

import httpx
from browser_support import ARTIFACTS, wait_for_event
from playwright.sync_api import expect


def test_widget_is_served_small_and_as_javascript(live_api: Any) -> None:
    response = httpx.get(live_api.base_url + "/widget/feedloop.js", headers={"Accept-Encoding": "identity"})
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert len(response.content) < 10_000
    assert b"window.FeedLoop" in response.content


def test_chat_dislike_and_correction_reach_redis(live_api: Any, page: Any) -> None:
    page.goto(live_api.base_url + "/")
    expect(page.get_by_role("heading", name="Chat, then rate the answers")).to_be_visible()

    page.get_by_label("Message", exact=True).fill("What is a feedback loop?")
    page.keyboard.press("Enter")

    answer = page.locator("li.message.assistant").last
    widget = answer.locator(".feedloop")
    # The widget is attached when the last chunk brings the feedback token, then loads the current state.
    expect(widget).to_have_attribute("data-state", "ready", timeout=120_000)
    streamed_text = answer.locator(".bubble").inner_text()
    assert streamed_text.strip(), "the streamed answer is empty"
    expect(answer.locator(".badge")).to_contain_text("feedloop")
    completion_id = answer.get_attribute("data-completion-id")
    assert completion_id and completion_id.startswith("chatcmpl-")

    dislike = widget.get_by_role("button", name="Dislike this answer", exact=True)
    like = widget.get_by_role("button", name="Like this answer", exact=True)
    dislike.click()
    expect(widget).to_have_attribute("data-state", "saved")
    expect(dislike).to_have_attribute("aria-pressed", "true")
    expect(like).to_have_attribute("aria-pressed", "false")
    expect(widget.get_by_role("status")).to_have_text("Thanks for your feedback")

    # A dislike opens the "suggest a better answer" box.
    correction_text = "A feedback loop feeds a system's outputs back in as inputs."
    correction = widget.get_by_label("Suggest a better answer")
    expect(correction).to_be_visible()
    correction.fill(correction_text)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo-page-correction.png"))
    widget.get_by_role("button", name="Send", exact=True).click()
    expect(widget.get_by_role("status")).to_have_text("Thanks, your note was sent")

    page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)

    event = wait_for_event(
        live_api,
        completion_id,
        lambda e: e.get("rating") == "dislike" and e.get("correction") == correction_text,
    )
    assert event["user"], "the demo page sends its anonymous user id"
    assert event["interaction"]["messages"][-1] == {"role": "user", "content": "What is a feedback loop?"}
    assert event["interaction"]["response"].strip() == streamed_text.strip()
    assert event["interaction"]["model"] == "feedloop"


def test_multi_turn_conversation_is_sent_back(live_api: Any, page: Any) -> None:
    requests: list[dict[str, Any]] = []
    page.on(
        "request",
        lambda r: requests.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None,
    )
    page.goto(live_api.base_url + "/")
    page.locator("#system-box summary").click()
    page.get_by_label("System prompt").fill("You are terse.")
    for text in ("First question", "Second question"):
        page.get_by_label("Message", exact=True).fill(text)
        page.locator("#send").click()
        expect(page.locator("li.message.assistant").last.locator(".feedloop")).to_have_attribute(
            "data-state", "ready", timeout=120_000
        )
    assert len(requests) == 2
    second = requests[1]
    assert second["model"] == "feedloop" and second["stream"] is True
    roles = [m["role"] for m in second["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert second["messages"][0]["content"] == "You are terse."
    first_answer = page.locator("li.message.assistant .bubble").first.inner_text()
    assert second["messages"][2]["content"].strip() == first_answer.strip()
