"""Streaming chat throughput and TTFT: feedloop's API against vLLM's own OpenAI server, same model, same load.

    .venv/bin/python bench/chat_vs_vllm.py [--rounds 6] [--requests-per-round 128] [--concurrency 64]
                                           [--profile data/bench-cache/chat-profile.txt]

Both servers run side by side in this one run: `feedloop serve` (interaction log on, writing to the local
Redis under a throw-away key prefix) and `python -m vllm.entrypoints.openai.api_server`, both on the tiny
test model with the engine arguments services/engine/engine.py passes to AsyncEngineArgs (read from the
same Settings). After a warm-up, measured rounds alternate between them in an A B B A A B ... order, so
load drift from other processes on the machine hits both alike.

Load: `--concurrency` streaming requests in flight (a closed loop), each asking for exactly `--max-tokens`
tokens (ignore_eos, temperature 1.0). The client is aiohttp on uvloop and parses the SSE stream itself.
TTFT is the time from sending a request to its first chunk with non-empty content. Besides the client's
view, the CPU time of each server's API process (and of its engine-core children) is read from /proc,
which is less noisy than wall time on a shared machine: the API process is where the two servers differ.

`--kind` picks the request: `plain` (the default), `json_schema` (a `response_format` JSON schema, through vLLM's
structured outputs; no ignore_eos, the grammar ends the answer) or `logprobs` (`logprobs` with `top_logprobs` 5
on every token). The warm-up checks that both servers did what the kind asks (every answer a JSON object, or
logprobs on its chunks), so a server that ignored the parameter is never measured against one that honoured it.

`--model smollm2` (or a model folder, or a packaged model's name) serves that model on both servers. `--adapter FOLDER`
(a published adapter of that model, manifest.json included) measures the adapter's cost instead: one
`feedloop serve` with the adapter active, the alias (through the adapter) against `feedloop-base` (the same
engine, no adapter), in the same alternating rounds.

Writes bench/results/chat_vs_vllm.json (chat_vs_vllm-<kind>.json for the other kinds, ...-adapter.json for the
adapter's cost) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness
from services.core.config import Settings
from services.engine.engine import serving_dtype

OURS, VLLM, BASE = "feedloop", "vllm", "feedloop-base"
LABELS = {OURS: "feedloop (ours)", VLLM: "vLLM OpenAI server", BASE: "feedloop, base model"}
ADAPTER_VERSION = "feedloop-v1"


@dataclass
class Sample:
    ttft_s: float | None
    latency_s: float
    completion_tokens: int
    error: str | None = None
    text: str = ""  # the streamed content (kept for the warm-up's check of the kind)
    logprobs_chunks: int = 0  # chunks that carried logprobs


@dataclass
class Round:
    server: str
    index: int
    wall_s: float
    samples: list[Sample]
    api_cpu_s: float
    engine_cpu_s: float

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]


@dataclass
class Target:
    name: str
    server: harness.Server
    url: str
    model: str
    kind: str = "plain"
    rounds: list[Round] = field(default_factory=list)


def engine_argv(settings: Settings, model: str, port: int) -> list[str]:
    """vLLM's server with the engine arguments of services/engine/engine.py (Engine.start)."""
    e = settings.engine
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        e.served_model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(e.max_model_len),
        "--enable-lora",
        "--max-lora-rank",
        str(e.max_lora_rank),
        "--max-loras",
        str(e.max_loras),
        "--max-cpu-loras",
        str(max(e.max_loras, 2) * 2),
        "--max-num-seqs",
        str(e.max_num_seqs),
        "--gpu-memory-utilization",
        str(e.gpu_memory_utilization),
        "--dtype",
        serving_dtype(e.dtype),
        "--seed",
        str(e.seed),
        # feedloop serves without an access log; vLLM logs every request unless told not to.
        "--disable-uvicorn-access-log",
    ]
    if e.enforce_eager:
        argv.append("--enforce-eager")
    return argv


def start_servers(args: argparse.Namespace, prefix: str) -> tuple[harness.Server, harness.Server, Settings]:
    model = harness.model_folder(args.model)
    settings = Settings(engine={"model": model, "max_model_len": 1024})
    common = {"VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kvcache_gib)}
    env = {**common, "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "1024"}
    ours = harness.feedloop_server("chat-feedloop", redis_url=args.redis_url, prefix=prefix, model=model, env=env)
    vllm_port = harness.free_port()
    vllm = harness.Server("chat-vllm", engine_argv(settings, model, vllm_port), common, vllm_port)
    print(f"starting feedloop serve on :{ours.port} and vLLM's server on :{vllm_port} (~1 min)", flush=True)
    ours.wait_ready("/readyz")
    vllm.wait_ready("/health")
    vllm.wait_ready("/v1/models")
    return ours, vllm, settings


def start_adapter_server(args: argparse.Namespace, prefix: str) -> tuple[harness.Server, Settings, str]:
    """`feedloop serve` with args.adapter (a published adapter folder, manifest.json included) active."""
    from redis import Redis

    from services.adapters.registry import AdapterRegistry
    from services.core.keys import Keys

    model = harness.model_folder(args.model)
    settings = Settings(engine={"model": model, "max_model_len": 1024})
    manifest = json.loads((args.adapter / "manifest.json").read_text())
    version = manifest["version"]
    data_dir = harness.LOGS.parent / prefix
    shutil.copytree(args.adapter, data_dir / "adapters" / version)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(settings.engine.cpu_kvcache_gib),
        "FEEDLOOP_ENGINE__MAX_MODEL_LEN": "1024",
        "FEEDLOOP_GATE__RECONCILE_INTERVAL_S": "1",
    }
    ours = harness.feedloop_server(
        "chat-feedloop-adapter", redis_url=args.redis_url, prefix=prefix, model=model, data_dir=data_dir, env=env
    )
    print(f"starting feedloop serve on :{ours.port} with adapter {version} (~1 min)", flush=True)
    ours.wait_ready("/readyz")
    registry = AdapterRegistry(Redis.from_url(args.redis_url), Keys(prefix))
    registry.register(version, str(data_dir / "adapters" / version), run_id=manifest["run_id"])
    registry.promote(version, by="bench")
    deadline = time.monotonic() + 120
    while alias_parent(ours.base_url, settings.engine.alias) != version:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the API did not serve {version} within 120 s (log: {ours.log_text()[-2000:]})")
        time.sleep(0.5)
    return ours, settings, version


def alias_parent(base_url: str, alias: str) -> str | None:
    import httpx

    models = httpx.get(base_url + "/v1/models", timeout=10).json()["data"]
    return next((m.get("parent") for m in models if m["id"] == alias), None)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user+system) of a process and of all its descendants."""
    import psutil

    proc = psutil.Process(pid)
    t = proc.cpu_times()
    children = 0.0
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            children += c.user + c.system
        except psutil.Error:
            pass
    return t.user + t.system, children


KINDS = ("plain", "json_schema", "logprobs")
STORY_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "sea": {"type": "string", "enum": ["calm", "rough"]},
                   "story": {"type": "string"}},
    "required": ["title", "sea", "story"],
    "additionalProperties": False,
}  # fmt: skip


def request_body(model: str, i: int, max_tokens: int, kind: str = "plain") -> bytes:
    import orjson

    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request {i}: tell me a story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "json_schema":
        del body["ignore_eos"]  # the grammar ends the answer; past its end only EOS is allowed
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": STORY_SCHEMA}}
    elif kind == "logprobs":
        body["logprobs"], body["top_logprobs"] = True, 5
    return orjson.dumps(body)


async def stream_one(session: Any, url: str, body: bytes) -> Sample:
    import orjson

    start = time.perf_counter()
    ttft: float | None = None
    tokens = 0
    parts: list[str] = []
    logprobs_chunks = 0
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                text = await resp.text()
                return Sample(None, time.perf_counter() - start, 0, f"HTTP {resp.status}: {text[:200]}")
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].rstrip()
                if payload == b"[DONE]":
                    break
                event = orjson.loads(payload)
                choices = event.get("choices")
                if choices:
                    content = choices[0].get("delta", {}).get("content")
                    if content:
                        parts.append(content)
                        if ttft is None:
                            ttft = time.perf_counter() - start
                    if choices[0].get("logprobs"):
                        logprobs_chunks += 1
                usage = event.get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    except Exception as e:  # a failed request is counted, not fatal
        return Sample(None, time.perf_counter() - start, 0, f"{type(e).__name__}: {e}")
    return Sample(ttft, time.perf_counter() - start, tokens, None, "".join(parts), logprobs_chunks)


def kind_problem(kind: str, samples: list[Sample]) -> str | None:
    """Why the answers show that the server did not do what the kind asks (None: they show it did), so that
    a server that ignored the parameter is never measured against one that honoured it."""
    ok = [s for s in samples if s.error is None]
    if kind == "logprobs" and any(s.logprobs_chunks == 0 for s in ok):
        return "an answer came without logprobs"
    if kind == "json_schema":
        free = [s.text for s in ok if not s.text.lstrip().startswith("{")]
        if free:
            return f"an answer is not the schema's JSON object: {free[0][:80]!r}"
    return None


async def run_round(session: Any, target: Target, n: int, concurrency: int, max_tokens: int, seq: list[int]):
    """n requests with `concurrency` in flight; returns (wall seconds, samples)."""
    bodies = [request_body(target.model, seq[0] + i, max_tokens, target.kind) for i in range(n)]
    seq[0] += n
    samples: list[Sample] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            body = bodies[next_index]
            next_index += 1
            samples.append(await stream_one(session, target.url, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, samples


def order(rounds: int, a: str, b: str) -> list[str]:
    """A B B A A B ...: each target goes first in half of the pairs."""
    out: list[str] = []
    for r in range(rounds):
        out += [a, b] if r % 2 == 0 else [b, a]
    return out


def summarize(rounds: list[Round]) -> dict[str, Any]:
    samples = [s for r in rounds for s in r.samples]
    ok = [s for s in samples if s.error is None]
    wall = sum(r.wall_s for r in rounds)
    tokens = sum(s.completion_tokens for s in ok)
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    latencies = [s.latency_s for s in ok]
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "output_tokens": tokens,
        "ttft_p50_ms": round(harness.percentile(ttfts, 50) * 1000, 2),
        "ttft_p99_ms": round(harness.percentile(ttfts, 99) * 1000, 2),
        "latency_p50_ms": round(harness.percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(harness.percentile(latencies, 99) * 1000, 1),
        "api_cpu_ms_per_request": round(sum(r.api_cpu_s for r in rounds) / max(1, len(ok)) * 1000, 3),
        "engine_cpu_ms_per_request": round(sum(r.engine_cpu_s for r in rounds) / max(1, len(ok)) * 1000, 3),
        "rounds": [
            {
                "index": r.index,
                "wall_s": round(r.wall_s, 3),
                "requests_per_s": round(len(r.ok) / r.wall_s, 2),
                "ttft_p50_ms": round(harness.percentile([s.ttft_s for s in r.ok if s.ttft_s], 50) * 1000, 2),
                "api_cpu_s": round(r.api_cpu_s, 3),
                "engine_cpu_s": round(r.engine_cpu_s, 3),
            }
            for r in rounds
        ],
    }


async def measure(targets: dict[str, Target], args: argparse.Namespace) -> None:
    import aiohttp

    seq = [0]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for name in targets:
            wall, samples = await run_round(session, targets[name], args.warmup, args.concurrency, args.max_tokens, seq)
            errors = [s.error for s in samples if s.error]
            print(f"warm-up {name}: {len(samples)} requests in {wall:.1f}s, {len(errors)} errors", flush=True)
            if errors:
                raise RuntimeError(f"{name} failed during warm-up: {errors[0]}")
            problem = kind_problem(args.kind, samples)
            if problem:
                raise RuntimeError(f"{name} in the {args.kind} warm-up: {problem}")
        plan = order(args.rounds, *targets)
        deadline = time.monotonic() + args.time_budget
        for i, name in enumerate(plan, 1):
            if i % 2 == 1 and i > 1 and time.monotonic() > deadline:
                print(f"time budget of {args.time_budget:.0f}s spent: stopping after {i - 1} rounds", flush=True)
                break
            t = targets[name]
            api0, eng0 = cpu_seconds(t.server.proc.pid)
            wall, samples = await run_round(session, t, args.requests_per_round, args.concurrency, args.max_tokens, seq)
            api1, eng1 = cpu_seconds(t.server.proc.pid)
            r = Round(name, i, wall, samples, api1 - api0, eng1 - eng0)
            t.rounds.append(r)
            ok = r.ok
            ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
            p50, p99 = harness.percentile(ttfts, 50), harness.percentile(ttfts, 99)
            print(
                f"round {i:2d}/{len(plan)} {name:8s} {len(ok):4d} ok {len(samples) - len(ok)} err "
                f"{wall:6.2f}s {len(ok) / wall:7.1f} req/s {sum(s.completion_tokens for s in ok) / wall:8.0f} tok/s "
                f"TTFT p50 {p50 * 1000:6.1f} ms p99 {p99 * 1000:6.1f} ms "
                f"API CPU {r.api_cpu_s / max(1, len(ok)) * 1000:5.2f} ms/req",
                flush=True,
            )


def engine_config_line(log: str) -> str:
    m = re.search(r"Initializing a V1 LLM engine \(v[^)]*\) with config: (.*)", log)
    return m.group(1).strip() if m else ""


def config_differences(a: str, b: str) -> list[str]:
    """Fields of vLLM's engine config line that differ between the two servers."""
    fa = set(re.split(r", (?=[a-z_]+=)", a))
    fb = set(re.split(r", (?=[a-z_]+=)", b))
    return sorted(f"{OURS}: {x}" for x in fa - fb) + sorted(f"{VLLM}: {x}" for x in fb - fa)


def start_profiler(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        print("py-spy is not installed (.venv/bin/pip install py-spy): not profiling", flush=True)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [str(spy), "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def report(targets: dict[str, Target], extra: dict[str, Any]) -> dict[str, Any]:
    first, second = targets
    ours, vllm = summarize(targets[first].rounds), summarize(targets[second].rounds)

    def ratio(key: str) -> float:
        return round(ours[key] / vllm[key], 3) if vllm[key] else float("nan")

    ratios: dict[str, Any] = {
        "requests_per_s": ratio("requests_per_s"),
        "output_tokens_per_s": ratio("output_tokens_per_s"),
        "ttft_p50": ratio("ttft_p50_ms"),
        "ttft_p99": ratio("ttft_p99_ms"),
        "api_cpu_per_request": ratio("api_cpu_ms_per_request"),
    }
    per_round = [
        a["requests_per_s"] / b["requests_per_s"]
        for a, b in zip(ours["rounds"], vllm["rounds"], strict=False)
        if b["requests_per_s"]
    ]
    ratios["requests_per_s_median_of_round_pairs"] = round(harness.percentile(per_round, 50), 3)
    ratios["requests_per_s_round_pairs"] = [round(x, 3) for x in per_round]
    targets_met = {
        "throughput_ratio_at_least_1": ratios["output_tokens_per_s"] >= 1.0,
        "ttft_p50_within_2ms": ours["ttft_p50_ms"] - vllm["ttft_p50_ms"] <= 2.0,
    }
    if second == BASE:  # the adapter's cost, not a comparison with vLLM
        return {**extra, "results": {first: ours, second: vllm}, "ratio_adapter_over_base": ratios}
    return {**extra, "results": {first: ours, second: vllm}, "ratio_ours_over_vllm": ratios, "targets": targets_met}


def table(result: dict[str, Any]) -> str:
    r = result["results"]
    first, second = r
    adapter = "ratio_adapter_over_base" in result
    q = result["ratio_adapter_over_base" if adapter else "ratio_ours_over_vllm"]
    rows = []
    labels = {**LABELS, OURS: "feedloop, LoRA adapter" if adapter else LABELS[OURS]}
    for label, key in ((labels[first], first), (labels[second], second)):
        s = r[key]
        rows.append(
            [
                label,
                s["requests"] - s["errors"],
                s["errors"],
                f"{s['requests_per_s']:.1f}",
                f"{s['output_tokens_per_s']:.0f}",
                f"{s['ttft_p50_ms']:.1f}",
                f"{s['ttft_p99_ms']:.1f}",
                f"{s['api_cpu_ms_per_request']:.2f}",
            ]
        )
    rows.append(
        [
            "ratio adapter/base" if adapter else "ratio ours/vLLM",
            "",
            "",
            f"{q['requests_per_s']:.3f}",
            f"{q['output_tokens_per_s']:.3f}",
            f"{q['ttft_p50']:.3f}",
            f"{q['ttft_p99']:.3f}",
            f"{q['api_cpu_per_request']:.3f}",
        ]
    )
    header = [
        "server",
        "requests",
        "errors",
        "requests/s",
        "output tokens/s",
        "TTFT p50 (ms)",
        "TTFT p99 (ms)",
        "API-process CPU (ms/request)",
    ]
    return harness.markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds per server")
    parser.add_argument("--requests-per-round", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=128, help="warm-up requests per server")
    parser.add_argument(
        "--time-budget", type=float, default=360, help="seconds of measured rounds; stops after a complete pair"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--profile", type=Path, help="py-spy (raw, collapsed stacks) of our API process")
    parser.add_argument("--kind", choices=KINDS, default="plain", help="plain chat, json_schema or logprobs")
    parser.add_argument("--output", type=Path, help="default: bench/results/chat_vs_vllm[-KIND][-adapter].json")
    parser.add_argument(
        "--model",
        help="a model folder, or a packaged model's name (smollm2: the default model), to serve "
        "(default: the tiny test model)",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        help="a published adapter folder of --model: measure ours through it against ours on the base model "
        "(the adapter's cost) instead of ours against vLLM",
    )
    args = parser.parse_args()
    if args.output is None:
        name = "chat_vs_vllm" + ("" if args.kind == "plain" else f"-{args.kind}") + ("-adapter" if args.adapter else "")
        args.output = harness.RESULTS / f"{name}.json"

    harness.install_cleanup()
    started = time.time()
    load_start = harness.load_average()
    prefix = f"flbench-chat-{uuid.uuid4().hex[:8]}"
    vllm_server: harness.Server | None = None
    if args.adapter:  # the same server on the base model's name
        ours_server, settings, _ = start_adapter_server(args, prefix)
        other_name, other_server = BASE, ours_server
    else:
        ours_server, vllm_server, settings = start_servers(args, prefix)
        other_name, other_server = VLLM, vllm_server
    other = Target(
        other_name,
        other_server,
        other_server.base_url + "/v1/chat/completions",
        settings.engine.served_model_name,
        args.kind,
    )
    targets = {
        OURS: Target(
            OURS, ours_server, ours_server.base_url + "/v1/chat/completions", settings.engine.alias, args.kind
        ),
        other.name: other,
    }
    profiler = start_profiler(ours_server.proc.pid, args.profile) if args.profile else None
    try:
        import uvloop

        uvloop.run(measure(targets, args))
    finally:
        if profiler is not None:
            profiler.send_signal(2)  # py-spy writes its output on SIGINT
            profiler.wait(timeout=60)
        ours_config = engine_config_line(ours_server.log_text())
        vllm_config = engine_config_line(vllm_server.log_text()) if vllm_server else ours_config
        ours_server.stop()
        if vllm_server:
            vllm_server.stop()
        deleted = harness.delete_prefix(args.redis_url, prefix)
    e = settings.engine
    result = report(
        targets,
        {
            **harness.result_header("chat_vs_vllm", started, load_start),
            "load": {
                "kind": args.kind,
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "ignore_eos": args.kind != "json_schema",
                "temperature": 1.0,
                "requests_per_round": args.requests_per_round,
                "rounds_per_server": len(targets[OURS].rounds),
                "warmup_requests_per_server": args.warmup,
                "order": "A B B A A B ... (alternating, each server first in half of the pairs)",
            },
            "model": settings.engine.model,
            "adapter": str(args.adapter) if args.adapter else None,
            "engine_args": {
                "max_model_len": e.max_model_len,
                "enable_lora": True,
                "max_lora_rank": e.max_lora_rank,
                "max_loras": e.max_loras,
                "max_cpu_loras": max(e.max_loras, 2) * 2,
                "max_num_seqs": e.max_num_seqs,
                "gpu_memory_utilization": e.gpu_memory_utilization,
                "dtype": e.dtype,
                "enforce_eager": e.enforce_eager,
                "seed": e.seed,
                "disable_log_stats": False,
                "enable_log_requests": False,
                "VLLM_CPU_KVCACHE_SPACE": e.cpu_kvcache_gib,
            },
            "engine_config_differences": config_differences(ours_config, vllm_config),
            "interaction_log": {"on": True, "redis_keys_written_and_deleted": deleted},
        },
    )
    harness.write_result(args.output, result)
    print()
    print(table(result))
    print()
    if result["engine_config_differences"]:
        print("engine config differences:", *result["engine_config_differences"], sep="\n  ")
    print(f"load average start {load_start}, end {result['load_average_end']}; written to {args.output}")


if __name__ == "__main__":
    main()
