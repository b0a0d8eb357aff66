"""The worker's per-step routing commit in vLLM's CPU build: vLLM's own against ``StepCommit``.

``verl-r3 bench commit [--json]``. The capture patch for vLLM's CPU build
(``verl_r3.patches.vllm_cpu_capture_0_32``) hands every step's routing rows to vLLM's worker-side
routing connector. It used to do that through the connector's ``prepare_output`` and
``process_output``, which walk every request of the step in Python; it now does it through
``StepCommit``. This benchmark times the two on the same work, outside an engine, so that the
figure is the commit's own and not the host's scheduling of vLLM's processes.

Two copies of the connector (vLLM's classes: request state, open-block buffer, block store)
follow one simulated schedule, whose step metadata vLLM's scheduler-side connector builds:
``requests`` requests of ``prompt_len`` tokens prefilled in one step, then decoded one token a
step for ``new_tokens`` steps. One copy commits each step through vLLM's path, the other through
``StepCommit``; both get the same rows, and their outputs are compared every step. The time of
starting the step (vLLM's ``begin_step``; ``StepCommit.begin``) and of the commit is summed over
the decode steps; which side goes first alternates step by step. Each repeat is a new schedule;
the result gives the medians over the repeats in microseconds per decode step and ``ratio =
step_commit / vllm``.
"""

from __future__ import annotations

import hashlib
import platform
import statistics
import time
from types import SimpleNamespace

import numpy as np

__all__ = ["SimRequest", "run", "vllm_commit", "worker_connector"]

SIDES = ("vllm", "step_commit")


class SimRequest:
    """What vLLM's scheduler-side routing connector reads of a request; ``num_computed`` is the
    simulated scheduler's. Block hashes chain over the tokens, as vLLM's prefix cache keys do."""

    def __init__(self, request_id: str, prompt: list[int], max_new: int, block_size: int) -> None:
        self.request_id, self.tokens, self.max_new, self.block_size = request_id, list(prompt), max_new, block_size
        self.num_prompt_tokens = len(prompt)
        self.sampling_params = SimpleNamespace(routed_experts_prompt_start=0)
        self.num_computed, self.finished = 0, False
        self._hashes: list[bytes] = []

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def block_hashes(self) -> list[bytes]:
        size = self.block_size
        while len(self._hashes) < len(self.tokens) // size:
            i = len(self._hashes)
            prev = self._hashes[-1] if self._hashes else b""
            block = np.asarray(self.tokens[i * size:(i + 1) * size], dtype=np.int64).tobytes()
            self._hashes.append(hashlib.sha256(prev + block).digest()[:16])
        return self._hashes

    def is_finished(self) -> bool:
        return self.finished


def worker_connector(*, block_size: int, layers: int, top_k: int, max_num_seqs: int, max_num_batched_tokens: int,
                     store_bytes: int = 1 << 26):
    """vLLM's worker-side routing connector, its open-block buffer and block store, without an engine
    (its constructor needs a model and a running vLLM config; the fields are the ones it sets)."""
    from threading import Lock

    from vllm.distributed.aux_output_connector.routed_experts import RoutedExpertsBuffer
    from vllm.distributed.aux_output_connector.store import BackgroundBlockObjectStore, BlockObjectStore
    from vllm.distributed.aux_output_connector.worker import AuxOutputWorkerConnector

    c = AuxOutputWorkerConnector.__new__(AuxOutputWorkerConnector)
    c._capturer = None
    c._store = BackgroundBlockObjectStore(BlockObjectStore(max_bytes=store_bytes,
                                                           object_nbytes=block_size * layers * top_k),
                                          max_pending_batches=2 * max_num_seqs)
    c._buffer = RoutedExpertsBuffer(np.dtype("uint8"), (layers, top_k), block_size, max_num_seqs,
                                    max_num_batched_tokens, 1)
    c._requests, c._generation, c._step_metadata = {}, 0, None
    c._pending_outputs, c._lock, c._max_concurrent_batches = [], Lock(), 1
    return c


def vllm_commit(connector, request_ids: list, token_starts, query_start_loc, rows, sampled) -> dict:
    """One step committed the way Model Runner V2 drives the connector (``prepare_output``, the copy
    to host, ``process_output``), with ``rows`` as the capturer's snapshot."""
    import torch

    connector._capturer = SimpleNamespace(snapshot_routing_data=lambda n: torch.from_numpy(rows[:n]))
    pending = connector.prepare_output(SimpleNamespace(req_ids=request_ids, query_start_loc_np=query_start_loc,
                                                       num_computed_tokens_np=token_starts))
    pending.enqueue_cpu_copy(sampled, np.zeros_like(sampled))
    return pending.process_output()


def _same(a, b) -> bool:
    return sorted(a) == sorted(b) and all(
        a[r].token_start == b[r].token_start and np.array_equal(a[r].rows, b[r].rows) for r in a)


def _one(seed: int, requests: int, prompt_len: int, new_tokens: int, layers: int, top_k: int, experts: int,
         block_size: int) -> tuple[dict[str, float], bool]:
    """Both sides over one schedule; microseconds per decode step for each, and whether every step's
    outputs were equal."""
    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector

    from verl_r3.patches.vllm_cpu_capture_0_32 import StepCommit

    rng = np.random.default_rng(seed)
    reqs = {f"r{i}": SimRequest(f"r{i}", rng.integers(1, 30000, prompt_len).tolist(), new_tokens, block_size)
            for i in range(requests)}
    scheduler = AuxOutputSchedulerConnector()
    kw = dict(block_size=block_size, layers=layers, top_k=top_k, max_num_seqs=requests,
              max_num_batched_tokens=requests * prompt_len)
    connectors = {side: worker_connector(**kw) for side in SIDES}
    commit = StepCommit(connectors["step_commit"])
    spent = dict.fromkeys(SIDES, 0.0)
    equal = True
    try:
        for step in range(new_tokens):
            scheduled = {rid: r.num_tokens - r.num_computed for rid, r in reqs.items()}
            meta = scheduler.build_connector_meta(SimpleNamespace(num_scheduled_tokens=scheduled), reqs)
            ids = list(scheduled)
            starts = np.array([reqs[r].num_computed for r in ids])
            bounds = np.cumsum([0] + [scheduled[r] for r in ids])
            rows = rng.integers(0, experts, (int(bounds[-1]), layers, top_k), dtype=np.uint8)
            sampled = np.ones(len(ids), dtype=np.int32)
            outputs = {}
            for side in (SIDES if (seed + step) % 2 == 0 else reversed(SIDES)):
                began = time.perf_counter()
                if side == "vllm":
                    connectors[side].begin_step(meta)
                    outputs[side] = vllm_commit(connectors[side], ids, starts, bounds, rows, sampled)
                else:
                    commit.begin(meta)
                    outputs[side] = commit(ids, starts, bounds, rows, sampled)
                if step:  # decode steps only; the first is every prompt's prefill
                    spent[side] += time.perf_counter() - began
            equal = equal and _same(outputs["vllm"], outputs["step_commit"])
            for rid in ids:
                reqs[rid].num_computed += scheduled[rid]
                reqs[rid].tokens.append(int(rng.integers(1, 30000)))
    finally:
        for c in connectors.values():
            c._store.close()
    steps = max(new_tokens - 1, 1)
    return {side: spent[side] / steps * 1e6 for side in SIDES}, equal


def run(*, requests: int = 32, prompt_len: int = 64, new_tokens: int = 64, layers: int = 4, top_k: int = 2,
        experts: int = 8, block_size: int = 32, repeats: int = 5, seed: int = 0) -> dict:
    """Measure both commits; see the module docstring."""
    for name, value in (("requests", requests), ("prompt_len", prompt_len), ("layers", layers), ("top_k", top_k),
                        ("block_size", block_size), ("repeats", repeats)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 (the first step is the prefill), got {new_tokens}")
    if not 2 <= experts <= 256:
        raise ValueError(f"experts must be in [2, 256] (routing is one byte per id here), got {experts}")
    if top_k > experts:
        raise ValueError(f"top_k ({top_k}) must not exceed experts ({experts})")
    import vllm

    from verl_r3.bench.capture import machine

    runs = {side: [] for side in SIDES}
    equal = True
    for k in range(repeats + 1):  # the first is a warm-up
        figures, same = _one(seed + k, requests, prompt_len, new_tokens, layers, top_k, experts, block_size)
        equal = equal and same
        if k:
            for side in SIDES:
                runs[side].append(figures[side])
    medians = {side: statistics.median(runs[side]) for side in SIDES}
    return {"us_per_step_vllm": medians["vllm"], "us_per_step_step_commit": medians["step_commit"],
            "ratio": medians["step_commit"] / medians["vllm"], "outputs_equal": equal, "repeats": repeats,
            "vllm_runs": runs["vllm"], "step_commit_runs": runs["step_commit"],
            "shape": {"requests": requests, "prompt_len": prompt_len, "new_tokens": new_tokens, "layers": layers,
                      "top_k": top_k, "experts": experts, "block_size": block_size},
            "machine": machine(python=platform.python_version(), vllm=vllm.__version__)}


def format_result(result: dict) -> str:
    s, m = result["shape"], result["machine"]
    lines = [
        "verl-r3 bench commit: the worker's per-step routing commit on vLLM's CPU build, vLLM's process_output vs "
        "StepCommit",
        f"shape    {s['requests']} requests, prompts of {s['prompt_len']} tokens, {s['new_tokens'] - 1} decode steps; "
        f"{s['layers']} layers, top-{s['top_k']}, {s['block_size']}-token blocks",
        "machine  " + ", ".join(f"{k} {v}" for k, v in m.items()),
        f"repeats  {result['repeats']} (+1 warm-up), sides alternating; median microseconds per decode step "
        "(starting the step + commit):",
    ]
    for side in SIDES:
        runs = ", ".join(f"{x:.1f}" for x in result[f"{side}_runs"])
        lines.append(f"  {side:<12}{result[f'us_per_step_{side}']:9.1f}   runs: {runs}")
    lines.append(f"ratio    {result['ratio']:.3f} step_commit / vllm")
    lines.append(f"outputs_equal {result['outputs_equal']}  (every step's per-request rows, both sides)")
    return "\n".join(lines)
