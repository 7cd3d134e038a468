"""Hot-swap under load: feedloop's promote -> alias switch, against restarting vLLM's own server.

    .venv/bin/python bench/hot_swap.py [--streams 32] [--swaps 3] [--restarts 1] [--max-tokens 32]

Same run, same tiny model, same load: `--streams` streaming clients in a closed loop (greedy, `--max-tokens`
tokens each) on the public model name.

* feedloop: `feedloop serve`; random-weight LoRA adapters are published (manifest + sha256) and
  registered; each swap is `POST /admin/adapters/{version}/promote` on a new version. Measured: time from
  sending the promote to the first token of the first response served by the new version (the response's
  system_fingerprint names its version), and failed requests (non-200, error, or a stream without its
  final chunk). The replica's own swap time (validate, load, warm-up, alias switch) comes from its
  feedloop_adapter_swap_duration_seconds histogram.
* vLLM: `python -m vllm.entrypoints.openai.api_server --enable-lora --lora-modules feedloop=<old>`; a swap
  is a restart with `--lora-modules feedloop=<new>` (how a server without hot-swap deploys a new adapter).
  Measured: time from stopping the old server to the first token from the new one, and failed requests:
  the clients keep sending (0.1 s back-off after a failure), as traffic from users would.

Writes bench/results/hot_swap.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from bench.chat_vs_vllm import engine_argv
from services.core.config import Settings

ADMIN_TOKEN = "bench-admin-token"
PROMPTS = [f"Tell me about topic number {i}." for i in range(16)]


@dataclass
class Response:
    started: float
    first_token: float | None = None
    version: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Closed-loop streaming clients; every response is recorded."""

    base_url: str
    model: str
    streams: int
    max_tokens: int
    responses: list[Response] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.streams + 8, max_keepalive_connections=self.streams + 8)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=120, limits=limits) as client:
            await asyncio.gather(*(self._user(client, i) for i in range(self.streams)))

    def outcome(self) -> dict[str, Any]:
        """How many requests were sent and failed, and the first few distinct failures."""
        failed = [r.error for r in self.responses if r.error]
        return {"requests": len(self.responses), "failed": len(failed), "failures": sorted(set(failed))[:5]}

    async def _user(self, client: httpx.AsyncClient, index: int) -> None:
        turn = 0
        while not self.stop.is_set():
            response = await self._one(client, PROMPTS[(index + turn) % len(PROMPTS)])
            self.responses.append(response)
            turn += 1
            if response.error:
                await asyncio.sleep(0.1)  # a client backs off a little after a failure, then retries

    async def _one(self, client: httpx.AsyncClient, prompt: str) -> Response:
        result = Response(time.monotonic())
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
        }
        finished = False
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}"
                    return result
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        finished = True
                    elif line.startswith("data: "):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            result.error = str(chunk["error"])[:200]
                        result.version = chunk.get("system_fingerprint") or result.version
                        if result.first_token is None and any(
                            (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])
                        ):
                            result.first_token = time.monotonic()
        except httpx.HTTPError as error:
            result.error = f"{type(error).__name__}"
        if result.error is None and not finished:
            result.error = "stream ended without [DONE]"
        return result


def swap_histogram(base_url: str) -> tuple[float, float]:
    text = httpx.get(base_url + "/metrics", timeout=30).text
    values = {}
    for name in ("sum", "count"):
        match = re.search(rf"^feedloop_adapter_swap_duration_seconds_{name} ([0-9.e+-]+)$", text, re.M)
        values[name] = float(match.group(1)) if match else 0.0
    return values["sum"], values["count"]


def publish_adapters(model: Path, adapters_dir: Path, redis_url: str, prefix: str, count: int) -> list[str]:
    """Random-weight LoRA adapters with manifests, registered as candidates."""
    import redis
    from tests.adapter_corpus import publish_lora

    from services.adapters.registry import AdapterRegistry
    from services.core.keys import Keys

    registry = AdapterRegistry(redis.Redis.from_url(redis_url), Keys(prefix))
    versions = []
    for seed in range(count):
        version = registry.next_version()
        path = publish_lora(model, adapters_dir, version, seed=100 + seed)
        registry.register(version, str(path), run_id=f"bench-{version}")
        versions.append(version)
    return versions


async def bench_feedloop(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    prefix = f"bench-swap-{uuid.uuid4().hex[:8]}"
    settings = Settings(engine={"model": str(model)})
    server = harness.feedloop_server(
        "hot-swap-feedloop",
        redis_url=args.redis_url,
        prefix=prefix,
        model=str(model),
        data_dir=workdir / "feedloop",
        adapters_dir=workdir / "adapters",
        env={
            "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kvcache_gib),
            "FEEDLOOP_API__ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        versions = publish_adapters(model, workdir / "adapters", args.redis_url, prefix, args.swaps + 1)
        print("starting feedloop serve ...", flush=True)
        server.wait_ready("/readyz")
        httpx.post(f"{server.base_url}/admin/adapters/{versions[0]}/promote?wait=true", headers=headers, timeout=120)
        load = Load(server.base_url, "feedloop", args.streams, args.max_tokens)
        swaps = []
        swap_sum, swap_count = swap_histogram(server.base_url)

        async def operator() -> None:
            await asyncio.sleep(args.settle_s)
            for version in versions[1:]:
                sent = time.monotonic()
                response = await asyncio.to_thread(
                    httpx.post,
                    f"{server.base_url}/admin/adapters/{version}/promote",
                    headers=headers,
                    timeout=60,
                )
                returned = time.monotonic()
                assert response.status_code == 200, response.text
                await asyncio.sleep(args.settle_s)
                swaps.append({"version": version, "sent": sent, "api_s": returned - sent})
            load.stop.set()

        await asyncio.gather(load.run(), operator())
        new_sum, new_count = swap_histogram(server.base_url)
    finally:
        server.stop()
        harness.delete_prefix(args.redis_url, prefix)
    for swap in swaps:
        firsts = [
            r.first_token
            for r in load.responses
            if r.version == swap["version"] and r.first_token is not None and r.error is None
        ]
        swap["to_first_token_s"] = min(firsts) - swap["sent"] if firsts else None
        del swap["sent"]
    return {
        "swaps": swaps,
        **load.outcome(),
        "replica_swap_s_mean": (new_sum - swap_sum) / (new_count - swap_count) if new_count > swap_count else None,
    }


async def bench_vllm_restart(args: argparse.Namespace, model: Path, workdir: Path) -> dict[str, Any]:
    from tests.adapter_corpus import save_lora

    settings = Settings(engine={"model": str(model)})
    adapters = [save_lora(model, workdir / f"vllm-lora-{i}", seed=200 + i) for i in range(args.restarts + 1)]
    port = harness.free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kvcache_gib)}

    def start(index: int) -> harness.Server:
        argv = [*engine_argv(settings, str(model), port), "--lora-modules", f"feedloop={adapters[index]}"]
        return harness.Server(f"hot-swap-vllm-{index}", argv, env, port)

    print("starting vLLM's server ...", flush=True)
    server = start(0)
    server.wait_ready("/v1/models")
    load = Load(server.base_url, "feedloop", args.streams, args.max_tokens)
    restarts: list[dict[str, Any]] = []

    async def operator() -> None:
        nonlocal server
        await asyncio.sleep(args.settle_s)
        for index in range(1, args.restarts + 1):
            began = time.monotonic()
            await asyncio.to_thread(server.stop)
            server = start(index)
            await asyncio.to_thread(server.wait_ready, "/v1/models")
            ready = time.monotonic()
            await asyncio.sleep(args.settle_s)
            restarts.append({"began": began, "ready_s": ready - began})
        load.stop.set()

    try:
        await asyncio.gather(load.run(), operator())
    finally:
        server.stop()
    for restart in restarts:
        began = restart.pop("began")
        firsts = [r.first_token for r in load.responses if r.started > began and r.error is None and r.first_token]
        restart["to_first_token_s"] = min(firsts) - began if firsts else None
        restart["failed_during"] = sum(1 for r in load.responses if r.error and r.started >= began - 1)
    return {"restarts": restarts, **load.outcome()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=3, help="feedloop promotions (each to a new version)")
    parser.add_argument("--restarts", type=int, default=1, help="vLLM server restarts with a new adapter")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--settle-s", type=float, default=3.0, help="load before/after each swap")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--output", type=Path, default=harness.RESULTS / "hot_swap.json")
    args = parser.parse_args()
    harness.install_cleanup()
    model = harness.tiny_model()
    harness.LOGS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=harness.LOGS.parent) as scratch:
        workdir = Path(scratch)
        load_before = harness.load_average()
        ours = asyncio.run(bench_feedloop(args, model, workdir))
        theirs = asyncio.run(bench_vllm_restart(args, model, workdir))
    ours_times = [s["to_first_token_s"] for s in ours["swaps"] if s["to_first_token_s"] is not None]
    restart_times = [r["to_first_token_s"] for r in theirs["restarts"] if r["to_first_token_s"] is not None]
    result = {
        "machine": harness.machine(),
        "load_average": {"before": load_before, "after": harness.load_average()},
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "feedloop": ours,
        "vllm_restart": theirs,
        "speedup_median": (harness.percentile(restart_times, 50) / harness.percentile(ours_times, 50))
        if ours_times
        else None,
    }
    harness.write_result(args.output, result)
    print(
        harness.markdown_table(
            ["", "to first token of new version (median / max)", "failed requests", "requests"],
            [
                [
                    "feedloop promote (hot-swap)",
                    f"{harness.percentile(ours_times, 50):.3f} s / {max(ours_times, default=0.0):.3f} s",
                    ours["failed"],
                    ours["requests"],
                ],
                [
                    "vLLM server restart",
                    f"{harness.percentile(restart_times, 50):.1f} s / {max(restart_times, default=0.0):.1f} s",
                    theirs["failed"],
                    theirs["requests"],
                ],
            ],
        )
    )
    if result["speedup_median"]:
        print(
            f"\nhot-swap is {result['speedup_median']:.0f}x faster; replica swap (validate+load+warm-up) "
            f"mean {ours['replica_swap_s_mean'] or float('nan'):.3f} s; load average {result['load_average']}"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
