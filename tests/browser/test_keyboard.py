"""The widget is usable with the keyboard alone and announces its state."""

from __future__ import annotations

from typing import Any

from browser_support import ALLOWED_PORT, host_page, new_completion, static_site, wait_for_event
from playwright.sync_api import expect

ACTIVE_LABEL = "document.activeElement.getAttribute('aria-label')"


def test_tab_enter_and_space_vote(live_api: Any, openai_client: Any, page: Any) -> None:
    user = "keyboard-user"
    completion_id, token = new_completion(openai_client, user)
    html = host_page(live_api.base_url, completion_id, token, user, "data-feedloop-comment")
    with static_site(ALLOWED_PORT, {"/": html}) as site:
        page.goto(site + "/")
        widget = page.locator("#rating .feedloop")
        expect(widget).to_have_attribute("data-state", "ready")
        like = widget.get_by_role("button", name="Like this answer", exact=True)
        dislike = widget.get_by_role("button", name="Dislike this answer", exact=True)
        expect(widget).to_have_attribute("role", "group")
        expect(widget.get_by_role("status")).to_have_attribute("aria-live", "polite")

        page.keyboard.press("Tab")
        assert page.evaluate(ACTIVE_LABEL) == "Like this answer"
        # A visible focus ring for keyboard users.
        assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"

        page.keyboard.press("Enter")
        expect(like).to_have_attribute("aria-pressed", "true")
        expect(widget).to_have_attribute("data-state", "saved")
        expect(widget.get_by_role("status")).to_have_text("Thanks for your feedback")
        wait_for_event(live_api, completion_id, lambda e: e.get("rating") == "like")

        page.keyboard.press("Tab")
        assert page.evaluate(ACTIVE_LABEL) == "Dislike this answer"
        page.keyboard.press("Space")
        expect(dislike).to_have_attribute("aria-pressed", "true")
        expect(like).to_have_attribute("aria-pressed", "false")
        expect(widget).to_have_attribute("data-state", "saved")
        wait_for_event(live_api, completion_id, lambda e: e.get("rating") == "dislike")

        # The comment box opens from its disclosure with the keyboard too.
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.tagName") == "SUMMARY"
        page.keyboard.press("Enter")
        comment = widget.get_by_label("Comment (optional)")
        expect(comment).to_be_visible()
        page.keyboard.press("Tab")
        page.keyboard.type("Too short.")
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")
        expect(widget.get_by_role("status")).to_have_text("Thanks, your note was sent")
        wait_for_event(live_api, completion_id, lambda e: e.get("comment") == "Too short.")
