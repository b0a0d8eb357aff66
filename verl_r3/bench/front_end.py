"""What vLLM's front end keeps alive for routing while requests run: ``verl-r3 bench front-end``.

vLLM's client decodes each step's outputs as views into the step's message, and its output
processor keeps each request's views until the request ends, so a request's routing keeps the
messages of its whole lifetime alive (``verl_r3.patches.vllm_front_end_routing_0_32``). This
benchmark runs one capturing vLLM engine on a tiny Qwen3-MoE with batches whose lengths have a
long tail, as a rollout's do (one request generates ``new_tokens``, the others from
``new_tokens // 16`` to ``new_tokens // 2``), under two sides in this process:

- ``vllm``: vLLM's own accumulation (the patch reverted while the side runs);
- ``verl_r3``: each request's rows copied into a ``bytearray`` of its own every 8 steps (the
  patch applied).

Memory: one sampled round per side, on the same batch. A task on the engine's event loop reads
the live requests' states every ``interval_ms`` (``routing_memory``) and counts ``held``, the bytes
of routing rows the requests hold; ``kept``, the bytes of the distinct buffers those rows keep
alive (message frames, or the requests' own ``bytearray`` and their last steps' frames); and ``objects``, the bytes of the Python
objects on the way (``sys.getsizeof``; what ZeroMQ allocates per frame is not counted).
``total`` is ``kept + objects``. It reports the sample with the largest ``total`` (``peak``) and the
last sample with a request still running (``tail``: the round ends with the longest requests alone,
which is where vLLM's front end keeps the most per byte held). Both sides must return the same
routing for every request.

Cost: ``rounds`` timed rounds per side, interleaved with the order alternating, each on a new
batch, without the sampler: generated tokens per second and this process's CPU milliseconds a
round (the front end's work), medians and ratios ``verl_r3 / vllm``. ``accumulate_us`` times
each side's accumulation alone, outside the engine (``accumulation_us``), in microseconds per
request and step.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import statistics
import sys
import tempfile

import numpy as np

from verl_r3.bench.capture import MAX_POSITIONS, _cpu_seconds, _order, build_model, machine

__all__ = ["SIDES", "run", "format_result", "routing_memory"]

SIDES = ("vllm", "verl_r3")


def _header(obj) -> int:
    """Bytes of a Python object itself, not of the data an array owns."""
    size = sys.getsizeof(obj)
    if isinstance(obj, np.ndarray) and obj.base is None:
        size -= obj.nbytes
    return size


def _chain(chunk: np.ndarray) -> tuple[list, object]:
    """The objects a routing chunk keeps alive through its ``base`` chain, and the owner of its
    bytes at the end of it (a message frame behind a memoryview, or an array owning its data)."""
    objects, owner = [chunk], chunk
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
        objects.append(owner)
    if isinstance(owner, memoryview):
        owner = owner.obj
        objects.append(owner)
    return objects, owner


def routing_memory(output_processor) -> dict:
    """What the live requests of an ``OutputProcessor`` hold for routing now: ``held`` (bytes of
    their routing rows), ``kept`` (bytes of the distinct buffers those rows keep alive: message
    frames, arrays, or what a ``RoutingRows`` allocated), ``objects`` (bytes of the Python objects
    on the way, by ``sys.getsizeof``: lists, arrays, memoryviews, frames, a ``RoutingRows`` with
    its ``bytearray``'s header and list), ``buffers`` and ``requests``. A ``RoutingRows``'s last
    steps, still vLLM's views, count as vLLM's do."""
    from verl_r3.patches.vllm_front_end_routing_0_32 import RoutingRows

    held, kept, objects = 0, {}, {}

    def views(chunks) -> int:  # vLLM's views: the objects and buffers each keeps alive
        for chunk in chunks:
            chain, owner = _chain(chunk)
            objects.update((id(o), _header(o)) for o in chain if o is not owner)
            objects[id(owner)] = _header(owner) if isinstance(owner, np.ndarray) else sys.getsizeof(owner)
            kept[id(owner)] = owner.nbytes if isinstance(owner, np.ndarray) else memoryview(owner).nbytes
        return sum(chunk.nbytes for chunk in chunks)

    states = list(output_processor.request_states.values())
    for state in states:
        chunks = state.routed_experts_chunks
        objects[id(chunks)] = sys.getsizeof(chunks)
        if isinstance(chunks, RoutingRows):
            views(chunks.pending)  # the last steps' views, kept as vLLM's are
            held += chunks.held_bytes
            kept[id(chunks)] = chunks.nbytes
            # the bytearray's header and the list of pending views
            objects[("inner", id(chunks))] = sys.getsizeof(bytearray()) + sys.getsizeof(chunks._pending)
        else:
            held += views(chunks)
    return {"held": held, "kept": sum(kept.values()), "objects": sum(objects.values()), "buffers": len(kept),
            "requests": len(states)}


def lengths(seed: int, prompts: int, new_tokens: int) -> list[int]:
    """Each request's generated tokens: the first ``new_tokens``, the others drawn from
    ``new_tokens // 16`` to ``new_tokens // 2``."""
    rng = random.Random(seed)
    low, high = max(1, new_tokens // 16), max(1, new_tokens // 2)
    return [new_tokens] + [rng.randint(low, high) for _ in range(prompts - 1)]


def _batch(seed: int, prompts: int, prompt_len: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(prompt_len)] for _ in range(prompts)]


async def _sampled(engine, requests, interval_s: float) -> tuple[object, dict]:
    from verl_r3.engines import vllm_engine as V

    memory = {"peak": {"total": 0}, "tail": None, "samples": 0}
    stop = asyncio.Event()

    async def sample():
        while not stop.is_set():
            now = routing_memory(engine.output_processor)
            now["total"] = now["kept"] + now["objects"]
            memory["samples"] += 1
            if now["total"] > memory["peak"]["total"]:
                memory["peak"] = now
            if now["requests"]:
                memory["tail"] = now
            try:
                await asyncio.wait_for(stop.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    try:
        figures = await V.run(engine, requests)
    finally:
        stop.set()
        await sampler
    if memory["tail"] is None:
        raise RuntimeError(f"no sample caught a request running (every {interval_s * 1e3:g} ms); sample more often")
    return figures, memory


def accumulation_us(prompt_len: int, new_tokens: int, row_shape: tuple, repeats: int = 7) -> dict[str, float]:
    """Microseconds per request and step of each side's accumulation alone, outside an engine:
    one request's prompt rows, then ``new_tokens`` steps of one row, then vLLM's
    ``np.concatenate`` at the end; ``repeats`` rounds of 200 requests, sides alternating, medians."""
    import time

    from verl_r3.patches.vllm_front_end_routing_0_32 import RoutingRows

    prompt = np.ones((prompt_len, *row_shape), np.uint8)
    step = np.ones((1, *row_shape), np.uint8)
    make = {"vllm": lambda: [], "verl_r3": lambda: RoutingRows("bench")}
    runs = {side: [] for side in SIDES}
    for i in range(repeats):
        for side in _order(list(SIDES), i):
            new = make[side]
            began = time.perf_counter()
            for _ in range(200):
                chunks = new()
                chunks.append(prompt)
                for _ in range(new_tokens):
                    chunks.append(step)
                np.concatenate(chunks, axis=0)
            runs[side].append((time.perf_counter() - began) / (200 * (new_tokens + 1)) * 1e6)
    return {side: statistics.median(runs[side]) for side in SIDES}


def run(*, rounds: int = 5, prompts: int = 32, prompt_len: int = 32, new_tokens: int = 192, layers: int = 4,
        experts: int = 8, top_k: int = 2, hidden: int = 128, interval_ms: float = 20.0, seed: int = 0) -> dict:
    """Measure both sides (see the module docstring) and return the result dict."""
    for name, value in (("rounds", rounds), ("prompts", prompts), ("prompt_len", prompt_len),
                        ("new_tokens", new_tokens), ("interval_ms", interval_ms)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    if prompt_len + new_tokens > MAX_POSITIONS:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the benchmark model's "
                         f"{MAX_POSITIONS} positions")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout is the table or JSON
    import vllm

    from verl_r3.engines import vllm_engine as V
    from verl_r3.patches import vllm_front_end_routing_0_32 as patch

    new = lengths(seed, prompts, new_tokens)
    shape = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new, "layers": layers,
             "experts": experts, "top_k": top_k, "hidden": hidden}

    def side_is(side: str) -> None:
        (patch.apply if side == "verl_r3" else patch.revert)()

    def requests(k: int) -> list:
        return [V.EngineRequest(p, n, temperature=0.0) for p, n in zip(_batch(seed + k, prompts, prompt_len), new)]

    def check(side: str, figures) -> None:
        for c in figures.completions:
            want = len(c.prompt_ids) + len(c.token_ids) - 1
            if c.routed_experts is None or c.routed_experts.shape[0] != want:
                got = None if c.routed_experts is None else c.routed_experts.shape[0]
                raise RuntimeError(f"{side}: request {c.request} returned {got} routing rows, expected {want}")

    async def main(path: str) -> dict:
        # No local keeps the engine once it is shut down: a frame that outlives this coroutine would
        # hold it until interpreter exit, where AsyncLLM.__del__ fails noisily.
        length = prompt_len + new_tokens
        engines = {"engine": V.start_engine(path, capture=True, max_model_len=length, max_num_seqs=prompts,
                                            max_num_batched_tokens=max(2048, length))}
        was_applied = patch.is_applied()  # the engine's start loaded verl_r3's plugin, which applies it
        try:
            side_is("verl_r3")
            await V.run(engines["engine"], requests(0))  # warm-up
            memory, routing = {}, {}
            for side in SIDES:  # the same batch: the same routing is expected back
                side_is(side)
                figures, memory[side] = await _sampled(engines["engine"], requests(1), interval_ms / 1e3)
                check(side, figures)
                routing[side] = [c.routed_experts for c in figures.completions]
            equal = all(np.array_equal(a, b) for a, b in zip(routing["vllm"], routing["verl_r3"]))
            tokens_per_s = {side: [] for side in SIDES}
            cpu_ms = {side: [] for side in SIDES}
            for i in range(rounds):
                for side in _order(list(SIDES), i):
                    side_is(side)
                    began = _cpu_seconds()
                    figures = await V.run(engines["engine"], requests(2 + i))
                    cpu_ms[side].append((_cpu_seconds() - began) * 1e3)
                    check(side, figures)
                    tokens_per_s[side].append(figures.generated_tokens / figures.seconds)
        finally:
            (patch.apply if was_applied else patch.revert)()
            engines.popitem()[1].shutdown()
        return {"memory": memory, "routing_equal": equal, "tokens_per_s": tokens_per_s, "cpu_ms": cpu_ms}

    with tempfile.TemporaryDirectory() as path:
        build_model(path, layers=layers, experts=experts, top_k=top_k, hidden=hidden, seed=seed)
        out = asyncio.run(main(path))
    med = {key: {side: statistics.median(out[key][side]) for side in SIDES} for key in ("tokens_per_s", "cpu_ms")}
    accumulate = accumulation_us(prompt_len, new_tokens, (layers, top_k))
    memory = out["memory"]
    return {
        "shape": shape, "rounds": rounds, "interval_ms": interval_ms,
        "machine": machine(vllm=vllm.__version__),
        "memory": memory, "routing_equal": out["routing_equal"],
        "peak_total_ratio": memory["verl_r3"]["peak"]["total"] / memory["vllm"]["peak"]["total"],
        "tokens_per_s": out["tokens_per_s"], "cpu_ms": out["cpu_ms"], "medians": med,
        "throughput_ratio": med["tokens_per_s"]["verl_r3"] / med["tokens_per_s"]["vllm"],
        "cpu_ratio": med["cpu_ms"]["verl_r3"] / med["cpu_ms"]["vllm"],
        "accumulate_us": accumulate,
    }


def format_result(r: dict) -> str:
    s, m = r["shape"], r["machine"]
    lines = [
        "verl-r3 bench front-end: routing kept alive in vLLM's front end while requests run, vLLM's own "
        "accumulation vs verl_r3's",
        f"shape    {s['prompts']} prompts of {s['prompt_len']} tokens, generating {min(s['new_tokens'])} to "
        f"{max(s['new_tokens'])} tokens; {s['layers']} layers, {s['experts']} experts, top-{s['top_k']}, "
        f"hidden {s['hidden']}",
        f"machine  {m['machine']}, {m['cpu_count']} CPUs, torch {m['torch']}, vllm {m['vllm']}",
        f"memory   one round per side on the same batch, sampled every {r['interval_ms']:g} ms; bytes kept alive "
        "for routing (buffers + Python objects) against the rows held, at the sample with the most (peak) and "
        "at the last with a request running (tail):",
        f"  {'side':9} {'sample':6} {'total':>9} {'buffers':>9} {'objects':>9} {'held':>9} {'n_buf':>6} "
        f"{'requests':>8} {'total/held':>11}",
    ]
    for side in SIDES:
        for which in ("peak", "tail"):
            x = r["memory"][side][which]
            lines.append(f"  {side:9} {which:6} {x['total']:>9} {x['kept']:>9} {x['objects']:>9} {x['held']:>9} "
                         f"{x['buffers']:>6} {x['requests']:>8} {x['total'] / max(1, x['held']):>11.2f}")
    lines.append(f"  peak total verl_r3 / vllm {r['peak_total_ratio']:.3f}; routing equal {r['routing_equal']}")
    lines.append(f"cost     {r['rounds']} rounds per side, interleaved, no sampling; medians:")
    for side in SIDES:
        lines.append(f"  {side:9} {r['medians']['tokens_per_s'][side]:8.1f} tokens/s  "
                     f"{r['medians']['cpu_ms'][side]:8.1f} ms front-end CPU a round   runs: "
                     + ", ".join(f"{v:.0f}" for v in r["tokens_per_s"][side]))
    lines.append(f"ratio    throughput {r['throughput_ratio']:.4f}, front-end CPU {r['cpu_ratio']:.4f} "
                 "(verl_r3 / vllm)")
    a = r["accumulate_us"]
    lines.append(f"accumulate  one request's rows alone (prompt, {max(s['new_tokens'])} steps, the concatenation), "
                 f"microseconds per step: vllm {a['vllm']:.3f}, verl_r3 {a['verl_r3']:.3f} "
                 f"(+{a['verl_r3'] - a['vllm']:.3f})")
    return "\n".join(lines)
