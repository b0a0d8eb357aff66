"""vLLM with routing capture, driven directly (tests, ``verl-r3 bench capture``, stress runs).

verl's own vLLM server needs none of this: it passes ``enable_return_routed_experts`` and reads
``CompletionOutput.routed_experts`` itself. This module starts the same engine (``AsyncLLM``)
outside verl, sends concurrent requests (optionally aborting some mid-way) and turns the
returned routing into ``RoutingRecord``s.

On CPU the capture comes from ``verl_r3.patches.vllm_cpu_capture_0_32``, applied in vLLM's
engine processes by the ``vllm.general_plugins`` entry point; vLLM is imported lazily, so this
module imports where vLLM is absent. Run it from a ``if __name__ == "__main__":`` guarded
script: vLLM starts its engine with multiprocessing spawn.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from verl_r3.core.formats import from_vllm
from verl_r3.core.record import RoutingRecord

__all__ = ["Completion", "EngineRequest", "RunFigures", "counter", "engine_args", "generate_one", "run", "start_engine"]


@dataclass
class EngineRequest:
    """One prompt, sampled ``n`` times; ``abort_after`` > 0 aborts it after that many tokens;
    ``request_id`` is the engine's id (default: unique per call)."""

    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    abort_after: int = 0
    request_id: str | None = None


@dataclass
class Completion:
    """One sample of a request: tokens, routing (``[prompt + generated - 1, L, K]`` as vLLM
    returns it) and what happened to it."""

    request: int
    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    routed_experts: object = None  # numpy array, or None when capture is off
    aborted: bool = False  # vLLM ended it with finish_reason "abort"
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    abort_sent: int | None = None  # the tokens streamed when the abort was sent; None: not sent

    def record(self, num_experts: int, *, num_layers: int | None = None) -> RoutingRecord:
        """The returned routing as a record (raises when there is none)."""
        if self.routed_experts is None:
            raise ValueError(f"request {self.request} sample {self.index}: the engine returned no routing "
                             f"({'aborted before its first token' if self.aborted else 'capture off?'})")
        return from_vllm(self.routed_experts, num_experts, num_layers=num_layers, sample=self.request)


@dataclass
class RunFigures:
    seconds: float = 0.0
    generated_tokens: int = 0
    completions: list[Completion] = field(default_factory=list)


def engine_args(model: str, *, capture: bool = True, dtype: str = "float32", max_model_len: int = 512,
                max_num_batched_tokens: int = 256, max_num_seqs: int = 64, num_blocks: int | None = None,
                block_size: int | None = None, prefix_caching: bool = True, seed: int = 0, **extra):
    """``AsyncEngineArgs`` for a small model on this machine (eager; on CPU 32-token blocks).

    ``num_blocks`` caps the KV cache (small values force preemption); routing capture needs
    prefix caching on (vLLM requires it, and keeps routing beside the cached blocks)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        block_size = block_size or 32  # the CPU attention kernels need a multiple of 32
    return AsyncEngineArgs(
        model=model, dtype=dtype, enforce_eager=True, seed=seed, max_model_len=max_model_len,
        max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix_caching, enable_return_routed_experts=capture,
        num_gpu_blocks_override=num_blocks, block_size=block_size, disable_log_stats=False, **extra)


def start_engine(model: str, **kw):
    """An ``AsyncLLM`` built from ``engine_args(model, **kw)``; call ``.shutdown()`` when done."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(engine_args(model, **kw))


async def generate_one(engine, index: int, req: EngineRequest) -> list[Completion]:
    """Send one request (``index`` names it) and read its stream to the end: after an abort, vLLM
    ends the stream with ``finish_reason="abort"`` and the routing of the tokens it generated."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=req.max_tokens, n=req.n, temperature=req.temperature, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    request_id = req.request_id or f"r{index}-{uuid.uuid4().hex[:8]}"
    latest = {}  # sample index -> its latest cumulative output (samples of n > 1 stream separately)
    cached = 0
    sent = None
    async for out in engine.generate({"prompt_token_ids": list(req.prompt_ids)}, params, request_id):
        latest.update((c.index, c) for c in out.outputs)
        cached = int(out.num_cached_tokens or 0)
        streamed = max((len(c.token_ids) for c in latest.values()), default=0)
        if req.abort_after and sent is None and not out.finished and streamed >= req.abort_after:
            sent = streamed
            await engine.abort(request_id)
    if not latest:  # aborted before its first output
        return [Completion(request=index, index=0, prompt_ids=list(req.prompt_ids), token_ids=[], aborted=True,
                           finish_reason="abort", abort_sent=sent)]
    return [Completion(request=index, index=i, prompt_ids=list(req.prompt_ids), token_ids=list(c.token_ids),
                       routed_experts=c.routed_experts, aborted=c.finish_reason == "abort",
                       num_cached_tokens=cached, finish_reason=c.finish_reason, abort_sent=sent)
            for i, c in sorted(latest.items())]


async def run(engine, requests: Sequence[EngineRequest]) -> RunFigures:
    """Send ``requests`` concurrently; wall time, generated tokens and every sample's completion.

    Call from the event loop the engine lives on (``asyncio.run(main())`` around engine start,
    runs and shutdown)."""
    began = time.perf_counter()
    groups = await asyncio.gather(*(generate_one(engine, i, r) for i, r in enumerate(requests)))
    seconds = time.perf_counter() - began
    completions = [c for group in groups for c in group]
    return RunFigures(seconds=seconds, generated_tokens=sum(len(c.token_ids) for c in completions),
                      completions=completions)


def counter(name: str) -> int:
    """A vLLM counter of this process so far (e.g. ``vllm:num_preemptions``,
    ``vllm:prefix_cache_hits``); 0 before the engine has counted any."""
    from vllm.v1.metrics.reader import get_metrics_snapshot

    return sum(int(getattr(m, "value", 0) or 0) for m in get_metrics_snapshot() if m.name == name)
