"""Zero-downtime hot-swap on the real API server (vLLM on CPU, the tiny model), driven by the admin API.

Adapters are real PEFT LoRA folders with random weights (tests/adapter_corpus.py), published with a
manifest into the server's adapters folder, registered and promoted through /admin/adapters. The served
alias must answer exactly as the versioned adapter does, swaps under load must not fail a request or mix
versions inside one response, and no adapter from the bad corpus may ever be served.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from services.adapters.registry import AdapterRegistry
from tests.conftest import ARTIFACTS, LiveApi, free_port, start_feedloop
from tests.support.adapter_corpus import build_bad_adapter_corpus, publish_lora
from tests.support.shared_server import serve_base_model

ALIAS, BASE = "feedloop", "feedloop-base"
PROMPTS = [f"Tell me about topic number {i}." for i in range(8)]
MAX_TOKENS = 24


def admin(live_api: LiveApi, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, live_api.base_url + path, headers=live_api.admin_headers(), timeout=120, **kwargs)


def registry(live_api: LiveApi) -> AdapterRegistry:
    return AdapterRegistry(live_api.redis, live_api.keys)


def publish_and_register(live_api: LiveApi, tiny_model_dir: Path, seed: int) -> str:
    """A random-weight adapter under the registry's next version name, registered as a candidate."""
    version = registry(live_api).next_version()
    path = publish_lora(tiny_model_dir, live_api.settings.training.adapters_dir, version, seed=seed)
    response = admin(live_api, "POST", "/admin/adapters", json={"path": str(path), "version": version})
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "candidate"
    return version


def chat(live_api: LiveApi, model: str, prompt: str) -> tuple[int, str, str | None]:
    """(status, greedy text, system_fingerprint)."""
    response = httpx.post(
        live_api.base_url + "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        timeout=120,
    )
    if response.status_code != 200:
        return response.status_code, "", None
    body = response.json()
    return 200, body["choices"][0]["message"]["content"], body["system_fingerprint"]


def served(live_api: LiveApi) -> str | None:
    return admin(live_api, "GET", "/admin/engine").json()["aliases"][ALIAS]


def metric(live_api: LiveApi, name: str, labels: str = "") -> float:
    text = httpx.get(live_api.base_url + "/metrics", timeout=30).text
    pattern = re.compile(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="module")
def versions(live_api: LiveApi, tiny_model_dir: Path) -> Iterator[list[str]]:
    yield [publish_and_register(live_api, tiny_model_dir, seed) for seed in range(11, 16)]
    serve_base_model(live_api)


def test_promoted_adapter_answers_under_the_alias(live_api: LiveApi, versions: list[str]) -> None:
    first = versions[0]
    base = {p: chat(live_api, BASE, p)[1] for p in PROMPTS[:3]}
    response = admin(live_api, "POST", f"/admin/adapters/{first}/promote", params={"wait": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["outcome"], body["active"], body["replica"]["serving"]) == ("promoted", first, first)
    for prompt in PROMPTS[:3]:
        status, via_alias, fingerprint = chat(live_api, ALIAS, prompt)
        _, via_name, name_fingerprint = chat(live_api, first, prompt)
        assert status == 200 and fingerprint == name_fingerprint == first
        assert via_alias == via_name
        assert via_alias != base[prompt]
    models = httpx.get(live_api.base_url + "/v1/models", timeout=30).json()["data"]
    assert {m["id"]: m["parent"] for m in models}[ALIAS] == first
    assert metric(live_api, "feedloop_active_adapter_info", f'{{version="{first}"}}') == 1.0
    listing = admin(live_api, "GET", "/admin/adapters").json()
    record = next(a for a in listing["adapters"] if a["version"] == first)
    assert (record["status"], record["activated_by"], record["dataset_version"]) == (
        "active", "admin", None,
    )  # fmt: skip
    assert listing["active"] == first


def test_rollback_pin_and_unpin_through_the_admin_api(live_api: LiveApi, versions: list[str]) -> None:
    older, newer = versions[0], versions[1]
    admin(live_api, "POST", f"/admin/adapters/{older}/promote", params={"wait": "true"})
    before_text = chat(live_api, older, PROMPTS[0])[1]
    promoted = admin(live_api, "POST", f"/admin/adapters/{newer}/promote", params={"wait": "true"}).json()
    assert (promoted["active"], promoted["previous"]) == (newer, older)
    assert chat(live_api, ALIAS, PROMPTS[0])[2] == newer
    # The previous version stays loaded for an instant rollback.
    loaded = {a["name"] for a in admin(live_api, "GET", "/admin/engine").json()["adapters"]}
    assert {older, newer} <= loaded

    rollbacks = metric(live_api, "feedloop_adapter_rollbacks_total")
    rolled = admin(live_api, "POST", "/admin/adapters/rollback", params={"wait": "true"})
    assert rolled.status_code == 200 and rolled.json()["active"] == older
    status, text, fingerprint = chat(live_api, ALIAS, PROMPTS[0])
    assert (status, fingerprint, text) == (200, older, before_text)
    assert metric(live_api, "feedloop_adapter_rollbacks_total") == rollbacks + 1
    again = admin(live_api, "POST", "/admin/adapters/rollback")
    assert again.status_code == 409 and again.json()["error"]["code"] == "no_previous_adapter"
    statuses = {a["version"]: a["status"] for a in admin(live_api, "GET", "/admin/adapters").json()["adapters"]}
    assert statuses[newer] == "retired" and statuses[older] == "active"

    pinned = admin(live_api, "POST", f"/admin/adapters/{newer}/pin", params={"wait": "true"}).json()
    assert (pinned["active"], pinned["pinned"], pinned["replica"]["serving"]) == (newer, newer, newer)
    assert admin(live_api, "GET", "/admin/adapters").json()["auto_promotion"] is False
    assert registry(live_api).promote(versions[2], auto=True).outcome == "pinned"  # what a training run does
    assert admin(live_api, "DELETE", "/admin/adapters/pin").json()["unpinned"] == newer
    assert admin(live_api, "GET", "/admin/adapters").json()["auto_promotion"] is True
    missing = admin(live_api, "POST", "/admin/adapters/feedloop-v999999/promote")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    unauthorized = httpx.get(live_api.base_url + "/admin/adapters", timeout=30)
    assert unauthorized.status_code == 401


@dataclass
class StreamResult:
    prompt: str
    started: float
    finished: float = 0.0
    text: str = ""
    fingerprints: set[str] = field(default_factory=set)
    done: bool = False
    feedback: bool = False
    error: str | None = None


async def stream_once(client: httpx.AsyncClient, prompt: str) -> StreamResult:
    result = StreamResult(prompt, time.monotonic())
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                result.fingerprints.add(chunk["system_fingerprint"])
                result.feedback = result.feedback or "feedback" in chunk
                for choice in chunk["choices"]:
                    result.text += choice["delta"].get("content") or ""
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    result.finished = time.monotonic()
    if result.error is None and not (result.done and result.feedback and len(result.fingerprints) == 1):
        result.error = f"incomplete stream (done={result.done}, fingerprints={result.fingerprints})"
    return result


async def load_during(live_api: LiveApi, steps: list[tuple[str, str]], clients: int = 32):
    """`clients` streaming clients in a closed loop while `steps` (admin calls, 1.5 s apart) run; the load
    goes on for 3 s after the last step."""
    results: list[StreamResult] = []
    marks: list[tuple[str, float]] = []
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=live_api.base_url, timeout=120, limits=limits) as client:

        async def user(index: int) -> None:
            turn = 0
            while not stop.is_set():
                results.append(await stream_once(client, PROMPTS[(index + turn) % len(PROMPTS)]))
                turn += 1

        async def operator() -> None:
            await asyncio.sleep(1.5)
            for method, path in steps:
                response = await client.request(method, path, headers=live_api.admin_headers())
                assert response.status_code == 200, response.text
                marks.append((path, time.monotonic()))
                await asyncio.sleep(1.5 if path != steps[-1][1] else 3.0)
            stop.set()

        await asyncio.gather(operator(), *(user(i) for i in range(clients)))
    return results, marks


def test_hot_swap_under_load_fails_nothing_and_never_mixes_versions(live_api: LiveApi, versions: list[str]) -> None:
    start, v1, v2, v3 = versions[1], versions[2], versions[3], versions[4]
    admin(live_api, "POST", f"/admin/adapters/{start}/promote", params={"wait": "true"})
    steps = [
        ("POST", f"/admin/adapters/{v1}/promote"),
        ("POST", f"/admin/adapters/{v2}/promote"),
        ("POST", f"/admin/adapters/{v3}/promote"),
        ("POST", "/admin/adapters/rollback"),
    ]
    results, marks = asyncio.run(load_during(live_api, steps))

    failed = [r for r in results if r.error]
    assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[0].error}"
    by_version: dict[str, list[StreamResult]] = {}
    for r in results:
        by_version.setdefault(next(iter(r.fingerprints)), []).append(r)
    assert {v1, v2, v3} <= set(by_version), f"versions served: {sorted(by_version)}"
    # After the rollback has been reconciled, v2 serves again and v3 never.
    rollback_at = marks[-1][1]
    late = [r for r in results if r.started > rollback_at + 1.5]
    assert late and {next(iter(r.fingerprints)) for r in late} == {v2}
    assert len(results) > 64

    # Each response is exactly what its version generates greedily for that prompt: nothing mixed mid-stream.
    # Every version is loaded again (by promotion) and asked by its own name.
    expected: dict[tuple[str, str], str] = {}
    for version in sorted(by_version):
        admin(live_api, "POST", f"/admin/adapters/{version}/promote", params={"wait": "true"})
        for prompt in {r.prompt for r in by_version[version]}:
            status, text, fingerprint = chat(live_api, version, prompt)
            assert status == 200 and fingerprint == version
            expected[(version, prompt)] = text
    mismatched = [
        (v, r.prompt, r.text) for v, rs in by_version.items() for r in rs if r.text != expected[(v, r.prompt)]
    ]
    assert not mismatched, f"{len(mismatched)} responses differ from their version's greedy output"
    for version in (v1, v2, v3):
        first = min(r.started for r in by_version[version]) - results[0].started
        print(f"{version}: {len(by_version[version])} responses, the first started at +{first:.2f}s")


def test_bad_adapters_are_rejected_with_their_reason_and_never_served(
    live_api: LiveApi, tiny_model_dir: Path, versions: list[str]
) -> None:
    good = versions[0]
    admin(live_api, "POST", f"/admin/adapters/{good}/promote", params={"wait": "true"})
    corpus = build_bad_adapter_corpus(
        tiny_model_dir,
        live_api.settings.training.adapters_dir,
        max_lora_rank=live_api.settings.engine.max_lora_rank,
        prefix=f"feedloop-bad{uuid.uuid4().hex[:6]}",
    )
    rejected_before = metric(live_api, "feedloop_adapter_swaps_total", '{outcome="rejected"}')
    for case in corpus:
        version = case.path.name
        registered = admin(live_api, "POST", "/admin/adapters", json={"path": str(case.path), "version": version})
        assert registered.status_code == 201, registered.text
        response = admin(live_api, "POST", f"/admin/adapters/{version}/promote", params={"wait": "true"})
        assert response.status_code == 200
        body = response.json()
        # The replica refused it; the registry went back to the version still served.
        assert body["active"] == good and body["replica"]["serving"] == good, (case.name, body)
        record = admin(live_api, "GET", f"/admin/adapters/{version}").json()
        assert record["status"] == "rejected", case.name
        assert record["reject_code"] == case.reason, (case.name, record["reasons"])
        assert record["reasons"][0].startswith(case.reason) and record["rejected_by"].startswith("replica ")
        assert served(live_api) == good
        assert chat(live_api, version, PROMPTS[0])[0] == 404
        assert chat(live_api, ALIAS, PROMPTS[0])[2] == good
        names = {m["id"] for m in httpx.get(live_api.base_url + "/v1/models", timeout=30).json()["data"]}
        assert version not in names
        again = admin(live_api, "POST", f"/admin/adapters/{version}/promote")
        assert again.status_code == 409 and again.json()["error"]["code"] == "adapter_rejected"
    assert metric(live_api, "feedloop_adapter_swaps_total", '{outcome="rejected"}') == rejected_before + len(corpus)


def test_a_starting_replica_serves_the_active_adapter_before_it_is_ready(
    live_api: LiveApi, versions: list[str]
) -> None:
    active, previous = versions[2], versions[3]
    admin(live_api, "POST", f"/admin/adapters/{previous}/promote", params={"wait": "true"})
    admin(live_api, "POST", f"/admin/adapters/{active}/promote", params={"wait": "true"})
    expected = chat(live_api, active, PROMPTS[1])[1]
    port = free_port()
    replica = start_feedloop(
        ["serve"],
        {**live_api.env, "FEEDLOOP_API__PORT": str(port)},
        port,
        ARTIFACTS / "logs" / "replica-2.log",
    )
    try:
        url = replica.base_url
        ready = httpx.get(url + "/readyz", timeout=30).json()
        assert ready["checks"]["adapter"] is True
        messages = [{"role": "user", "content": PROMPTS[1]}]
        first = httpx.post(
            url + "/v1/chat/completions",
            json={"model": ALIAS, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0},
            timeout=120,
        ).json()
        assert first["system_fingerprint"] == active and first["choices"][0]["message"]["content"] == expected
        engine = httpx.get(url + "/admin/engine", headers=live_api.admin_headers(), timeout=30).json()
        assert {a["name"] for a in engine["adapters"]} == {
            active,
            previous,
        }  # previous preloaded for rollback
        # A promotion on the first replica reaches this one through the registry's channel.
        admin(live_api, "POST", "/admin/adapters/rollback", params={"wait": "true"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            engine = httpx.get(url + "/admin/engine", headers=live_api.admin_headers(), timeout=30).json()
            if engine["aliases"][ALIAS] == previous:
                break
            time.sleep(0.1)
        assert engine["aliases"][ALIAS] == previous
    finally:
        replica.stop()
