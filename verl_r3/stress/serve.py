"""The engine side of ``verl-r3 stress``: send the wave concurrently, abort some, send a follow-up.

``serve(spec)`` starts one engine on ``spec["model"]`` (fp32, routing capture on), sends every
request of ``spec["requests"]`` (``verl_r3.stress.workload``) at once, aborts each request that
has an ``abort_after`` as soon as that many of its tokens have been streamed, waits for every
request to end, then sends ``workload.follow_up`` alone. It returns plain values: one outcome
per request (below), the follow-up's outcome, the engine's own counters and the wave's wall
time. Nothing here compares routing; ``verl_r3.stress.check`` does, where transformers runs.

The abort is each engine's own per-request mechanism, and the request is then read to its end,
so the outcome holds the engine's final status, not the caller's:

* ``hf``: ``HFBatcher.abort(request_id)`` (``verl_r3.integration.hf_rollout``); progress is
  polled with ``HFBatcher.progress``, about once a decode step;
* ``vllm``: ``AsyncLLM.abort(request_id)``; vLLM then ends the request's stream with
  ``finish_reason="abort"`` and the routing of the tokens it had generated;
* ``sglang``: ``TokenizerManager.abort_request(rid=...)``, what SGLang's ``/abort_request``
  endpoint calls; the streamed request ends with ``finish_reason.type == "abort"``.

Each engine runs in a child process (``python -m verl_r3.stress.serve SPEC OUT``; SGLang with
its own environment's interpreter), which writes the result as JSON to ``OUT``. Outcome
keys: ``index``, ``status`` ("completed", "aborted" or "error"), ``finish`` (the engine's
reason), ``token_ids``, ``abort_sent`` (the tokens streamed when the abort was sent, or None),
``routing`` (None, ``{"format": "dense", "data": [rows, L, K]}`` or ``{"format": "sglang",
"data": base64, "prompt_tokens": n, "completion_tokens": m}``, SGLang's payload with the token
counts that tell its rows and the width of an id), ``cached_tokens``, ``error``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from verl_r3.stress import workload

__all__ = ["serve"]

POLL_S = 0.02  # how often the hf driver looks at an aborting request's progress (about a decode step)
STATUS = {"abort": "aborted", "length": "completed", "stop": "completed"}  # vLLM's and SGLang's finish reasons


def _rid(index: int) -> str:
    """The engine request id of request ``index``. Fixed width: SGLang aborts every request whose
    id *starts with* the one given, so "stress-3" would also abort "stress-30" to "stress-39"."""
    return f"stress-{index:06d}"


def _outcome(index: int, status: str, finish, token_ids, abort_sent, routing, cached=None, error=None) -> dict:
    return {"index": index, "status": status, "finish": finish, "token_ids": [int(t) for t in token_ids],
            "abort_sent": abort_sent, "routing": routing, "cached_tokens": cached, "error": error}


def _failed(index: int, exc: BaseException) -> dict:
    return _outcome(index, "error", None, [], None, None, error=f"{type(exc).__name__}: {exc}")


async def _wave(one, requests: list[workload.StressRequest]) -> tuple[list[dict], dict, float]:
    """Run ``one(request)`` for every request at once, then the follow-up; a request that raises
    becomes an "error" outcome (the others go on)."""
    async def guarded(req):
        try:
            return await one(req)
        except Exception as exc:  # noqa: BLE001 - reported per request by the check
            return _failed(req.index, exc)

    began = time.perf_counter()
    outcomes = await asyncio.gather(*(guarded(r) for r in requests))
    seconds = time.perf_counter() - began
    follow = workload.follow_up(requests, [o["token_ids"] for o in outcomes],
                                [o["status"] == "aborted" for o in outcomes])
    return list(outcomes), {**await guarded(follow), "prompt_ids": follow.prompt_ids}, seconds


# -- hf ---------------------------------------------------------------------------------------
async def _serve_hf(spec: dict, requests) -> dict:
    import torch

    from verl_r3.integration.hf_rollout import HFBatcher, HFGenerator, Request

    generator = HFGenerator(spec["model"], dtype=torch.float32, capture_routing=True, seed=spec["seed"])
    batcher = HFBatcher(generator, max_batch=spec["engine_args"]["max_batch"])

    async def one(r: workload.StressRequest) -> dict:
        rid = _rid(r.index)
        task = asyncio.ensure_future(batcher.generate(Request(
            prompt_ids=list(r.prompt_ids), max_tokens=r.max_tokens, seed=spec["seed"] * 100003 + r.index,
            request_id=rid)))
        sent = None
        while r.abort_after is not None and sent is None and not task.done():
            streamed = batcher.progress(rid) or 0
            if streamed >= r.abort_after and batcher.abort(rid):
                sent = streamed
            await asyncio.sleep(POLL_S)
        res = await task
        routing = None if res.routed_experts is None else {"format": "dense", "data": res.routed_experts}
        return _outcome(r.index, res.stop_reason, res.stop_reason, res.token_ids, sent, routing)

    outcomes, follow, seconds = await _wave(one, requests)
    import transformers

    return {"outcomes": outcomes, "follow_up": follow, "seconds": seconds,
            "stats": {"batches": batcher.batches, "max_batch": batcher.max_batch},
            "versions": {"transformers": transformers.__version__, "engine_torch": torch.__version__}}


# -- vLLM -------------------------------------------------------------------------------------
async def _serve_vllm(spec: dict, requests) -> dict:
    import torch
    import vllm

    from verl_r3.engines import vllm_engine

    engine = vllm_engine.start_engine(spec["model"], capture=True, seed=spec["seed"], **spec["engine_args"])
    try:
        async def one(r: workload.StressRequest) -> dict:
            [c] = await vllm_engine.generate_one(engine, r.index, vllm_engine.EngineRequest(
                list(r.prompt_ids), r.max_tokens, abort_after=r.abort_after or 0, request_id=_rid(r.index)))
            status = STATUS.get(c.finish_reason, "error")
            routing = None if c.routed_experts is None else {"format": "dense", "data": c.routed_experts.tolist()}
            return _outcome(r.index, status, c.finish_reason, c.token_ids, c.abort_sent, routing,
                            cached=c.num_cached_tokens,
                            error=None if status != "error" else f"finish_reason {c.finish_reason!r}")

        outcomes, follow, seconds = await _wave(one, requests)
        stats = {"preemptions": vllm_engine.counter("vllm:num_preemptions"),
                 "prefix_cache_hit_tokens": vllm_engine.counter("vllm:prefix_cache_hits")}
    finally:
        engine.shutdown()
    return {"outcomes": outcomes, "follow_up": follow, "seconds": seconds, "stats": stats,
            "versions": {"vllm": vllm.__version__, "engine_torch": torch.__version__}}


# -- SGLang -----------------------------------------------------------------------------------
def _serve_sglang(spec: dict, requests) -> dict:
    import sglang
    import torch

    from verl_r3.engines.sglang_engine import start_cpu_engine

    engine = start_cpu_engine(spec["model"], random_seed=spec["seed"], log_level="warning", **spec["engine_args"])
    retractions = {}
    try:
        async def one(r: workload.StressRequest) -> dict:
            rid = _rid(r.index)
            stream = await engine.async_generate(
                input_ids=list(r.prompt_ids), sampling_params={"max_new_tokens": r.max_tokens, "temperature": 1.0},
                return_routed_experts=True, stream=True, rid=rid)
            sent, final = None, None
            async for final in stream:  # cumulative output_ids (SGLang's default streaming)
                streamed = len(final["output_ids"])
                if r.abort_after is not None and sent is None and streamed >= r.abort_after \
                        and final["meta_info"].get("finish_reason") is None:
                    sent = streamed
                    engine.tokenizer_manager.abort_request(rid=rid)
            meta = final["meta_info"]
            finish = (meta.get("finish_reason") or {}).get("type")
            status = STATUS.get(finish, "error")
            retractions[r.index] = int(meta.get("num_retractions") or 0)
            routing = meta.get("routed_experts")
            return _outcome(r.index, status, finish, final["output_ids"], sent,
                            None if routing is None else {"format": "sglang", "data": routing,
                                                          "prompt_tokens": meta["prompt_tokens"],
                                                          "completion_tokens": meta["completion_tokens"]},
                            cached=int(meta.get("cached_tokens") or 0),
                            error=None if status != "error" else f"finish_reason {meta.get('finish_reason')!r}")

        outcomes, follow, seconds = engine.loop.run_until_complete(_wave(one, requests))
    finally:
        engine.shutdown()
    return {"outcomes": outcomes, "follow_up": follow, "seconds": seconds,
            "stats": {"retractions": sum(retractions.values()),
                      "retracted_requests": sum(1 for v in retractions.values() if v)},
            "versions": {"sglang": sglang.__version__, "engine_torch": torch.__version__}}


def serve(spec: dict) -> dict:
    """Run ``spec`` on its engine (see the module docstring)."""
    requests = [workload.StressRequest(**r) for r in spec["requests"]]
    if spec["engine"] == "hf":
        return asyncio.run(_serve_hf(spec, requests))
    if spec["engine"] == "vllm":
        return asyncio.run(_serve_vllm(spec, requests))
    if spec["engine"] == "sglang":
        return _serve_sglang(spec, requests)
    raise ValueError(f"unknown engine {spec['engine']!r}")


def _plain(value):
    """JSON form of numpy arrays inside an outcome."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot encode {type(value).__name__}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m verl_r3.stress.serve SPEC_JSON OUT_JSON", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    result = serve(spec)
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=_plain)
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":  # vLLM and SGLang spawn their engine processes: keep this guard
    sys.exit(main(sys.argv[1:]))
