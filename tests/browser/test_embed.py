"""The widget embedded in a third-party page on another origin, loaded with one <script> tag from the API.

The live_api server allows the origin http://127.0.0.1:<ALLOWED_PORT> (CORS) and no other."""

from __future__ import annotations

import time
from typing import Any

from browser_support import (
    ALLOWED_PORT,
    FORBIDDEN_PORT,
    feedback_events,
    host_page,
    new_completion,
    static_site,
    wait_for_event,
)
from playwright.sync_api import expect


def test_allowed_origin_records_restores_and_withdraws_a_vote(live_api: Any, openai_client: Any, page: Any) -> None:
    user = "embed-allowed"
    completion_id, token = new_completion(openai_client, user)
    html = host_page(live_api.base_url, completion_id, token, user)
    with static_site(ALLOWED_PORT, {"/": html}) as site:
        page.goto(site + "/")
        widget = page.locator("#rating .feedloop")
        like = widget.get_by_role("button", name="Like this answer", exact=True)
        # The endpoint defaults to the origin the script came from, not the host page's origin.
        assert page.evaluate("FeedLoop.version")
        expect(widget).to_have_attribute("data-state", "ready")
        expect(like).to_have_attribute("aria-pressed", "false")

        like.click()
        expect(widget).to_have_attribute("data-state", "saved")
        expect(like).to_have_attribute("aria-pressed", "true")
        expect(widget.get_by_role("status")).to_have_text("Thanks for your feedback")
        event = wait_for_event(live_api, completion_id, lambda e: e.get("rating") == "like")
        assert event["user"] == user

        # A new page load shows the recorded vote (GET /v1/feedback/{id}).
        page.reload()
        widget = page.locator("#rating .feedloop")
        like = widget.get_by_role("button", name="Like this answer", exact=True)
        expect(widget).to_have_attribute("data-state", "ready")
        expect(like).to_have_attribute("aria-pressed", "true")

        # Pressing the pressed button again withdraws the vote (DELETE).
        like.click()
        expect(widget).to_have_attribute("data-state", "saved")
        expect(like).to_have_attribute("aria-pressed", "false")
        expect(widget.get_by_role("status")).to_have_text("Your rating was removed")
        wait_for_event(live_api, completion_id, lambda e: e.get("rating") == "withdrawn")


def test_forbidden_origin_is_refused_by_cors_and_shows_an_error(live_api: Any, openai_client: Any, page: Any) -> None:
    user = "embed-forbidden"
    completion_id, token = new_completion(openai_client, user)
    feedback_posts: list[str] = []
    page.on("request", lambda r: feedback_posts.append(r.method) if r.url.endswith("/v1/feedback") else None)
    html = host_page(live_api.base_url, completion_id, token, user)
    with static_site(FORBIDDEN_PORT, {"/": html}) as site:
        page.goto(site + "/")
        widget = page.locator("#rating .feedloop")
        like = widget.get_by_role("button", name="Like this answer", exact=True)
        # The script itself loads (a plain <script> needs no CORS); the state GET is blocked.
        expect(widget).to_have_attribute("data-state", "ready")

        like.click()
        # The widget retries with backoff (~3.5 s in all), then gives up with an error and a retry button.
        expect(widget).to_have_attribute("data-state", "error", timeout=30_000)
        expect(widget.get_by_role("status")).to_have_text("Couldn't send your feedback.")
        expect(widget.get_by_role("button", name="Retry")).to_be_visible()
        expect(like).to_have_attribute("aria-pressed", "false")

    assert feedback_posts == ["POST"] * 4, "the widget tries 4 times before giving up"
    # The browser's preflight was refused, so the POST never reached the API: nothing in Redis.
    assert feedback_events(live_api, completion_id) == []
    assert not live_api.redis.exists(live_api.keys.votes(completion_id))


def test_bad_token_is_refused_once_without_retries(live_api: Any, openai_client: Any, page: Any) -> None:
    user = "embed-bad-token"
    completion_id, token = new_completion(openai_client, user)
    forged = token.split(".")[0] + ".forged"
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.request.method == "POST" else None)
    with static_site(ALLOWED_PORT, {"/": host_page(live_api.base_url, completion_id, forged, user)}) as site:
        page.goto(site + "/")
        widget = page.locator("#rating .feedloop")
        expect(widget).to_have_attribute("data-state", "ready")
        widget.get_by_role("button", name="Like this answer", exact=True).click()
        expect(widget).to_have_attribute("data-state", "error")
        expect(widget.get_by_role("status")).to_have_text("Not allowed.")
        # A 4xx other than 429 is final: no retry and no retry button.
        expect(widget.get_by_role("button", name="Retry")).to_be_hidden()
        page.wait_for_timeout(1500)
    assert statuses == [403]
    assert feedback_events(live_api, completion_id) == []


def test_rate_limited_vote_is_retried_until_it_passes(live_api: Any, openai_client: Any, page: Any) -> None:
    user = "embed-rate-limited"
    completion_id, token = new_completion(openai_client, user)
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.request.method == "POST" else None)
    with static_site(ALLOWED_PORT, {"/": host_page(live_api.base_url, completion_id, token, user)}) as site:
        page.goto(site + "/")
        widget = page.locator("#rating .feedloop")
        expect(widget).to_have_attribute("data-state", "ready")
        # Empty this user's token bucket, refilling only from 0.8 s from now: the first POST gets a 429,
        # and one of the widget's retries (at ~0.5, ~1.5, ~3.5 s) gets through.
        bucket = live_api.keys.rate_limit("user", user)
        live_api.redis.hset(bucket, mapping={"tokens": 0, "ts": repr(time.time() + 0.8)})
        widget.get_by_role("button", name="Like this answer", exact=True).click()
        expect(widget).to_have_attribute("data-state", "saved", timeout=20_000)
    assert statuses[0] == 429 and statuses[-1] == 202, statuses
    wait_for_event(live_api, completion_id, lambda e: e.get("rating") == "like")
