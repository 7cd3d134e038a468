"""The engine's own vllm:* metrics reach the API process's default registry, beside feedloop's."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.core import metrics
from services.engine.engine import Engine


def scrape() -> dict[str, list[tuple[str, dict[str, str], float]]]:
    body, _content_type = metrics.latest_metrics()
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        families[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return families


async def test_vllm_engine_metrics_on_the_default_registry(tiny_engine: Engine) -> None:
    from vllm import SamplingParams

    prompt = tiny_engine.render([{"role": "user", "content": "Hello"}])
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
    async for _ in tiny_engine.generate(prompt, params, "metrics-test-1", tiny_engine.resolve("feedloop-base")):
        pass

    families = scrape()
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
        assert name in families, f"{name} missing from the default registry"
        assert families[name][0][1]["model_name"] == "feedloop-base"
    generated = sum(v for n, _labels, v in families["vllm:generation_tokens"] if n.endswith("_total"))
    assert generated >= 8
    assert sum(v for _n, _labels, v in families["vllm:num_requests_running"]) == 0  # finished


async def test_engine_collector_reports_lora_slots(tiny_engine: Engine) -> None:
    settings = tiny_engine.settings
    metrics.engine_collector(
        lambda: metrics.EngineStats(
            lora_slots_used=len(tiny_engine.list_adapters()), lora_slots_max=settings.engine.max_loras * 2
        )
    )
    try:
        families = scrape()
        assert families[metrics.ENGINE_LORA_SLOTS_USED][0][2] == 0
        assert families[metrics.ENGINE_LORA_SLOTS_MAX][0][2] == settings.engine.max_loras * 2
        assert metrics.ENGINE_KV_CACHE_USAGE not in families  # left to vllm:kv_cache_usage_perc
    finally:
        metrics.unregister_engine_collector()
