"""Memory of routing in one training step, by layout: bytes per id and peak over the unpadded payload.

Nothing of the step's size is allocated. The sample lengths are drawn (or given), the
micro-batches are verl's own partition of them (``get_seqlen_balanced_partitions`` with the
count verl's ``rearrange_micro_batches`` computes), and each layout's tensors are built on
PyTorch's ``meta`` device (shapes and dtypes, no storage): ``compact_rows`` decides the carried
dtype from a block of real ids, and each rank's largest micro-batch goes through
``verl_r3.integration.fsdp_replay.micro_batch_routing`` (for real: one micro-batch is tens of MB;
its output is the one routing allocation of a micro-batch). Sizes are those tensors' ``nbytes``.

Layouts
    ``verl_padded``: verl's DataProto trainer (``ray_trainer``, used when TransferQueue is off):
        ``int16 [B, P + R, L, K]`` padded to the longest prompt and response the config allows,
        in the driver's batch; each data-parallel rank holds its rows of it and, during a call,
        the jagged ``int16`` copy ``left_right_2_no_padding`` makes.
    ``verl``: verl 0.9's v1 trainer (TransferQueue): one ``int16 [n, L, K]`` block per sample
        of ``n`` tokens; each rank fetches its samples' blocks for a call.
    ``verl_r3``: the v1 trainer with ``verl_r3.patches.verl_agent_loop_routing_0_9``: the same
        blocks as ``compact_rows`` stores them (``uint8`` for up to 256 experts).
    On a rank, during an update: its samples' blocks; for verl's layouts the micro-batch copies
    verl's engine splits every field into before the first forward (``FSDPReplayEngine`` keeps
    the routing aside and cuts each micro-batch's rows from it instead); the copy of the
    mini-batch verl's worker runs (``1 / mini_batches`` of the rank's samples); and what the
    largest micro-batch holds: its dense routing (``int16`` for verl's layouts, ``replay_dtype``,
    ``uint8`` wherever the routing is carried as ``uint8``, for verl_r3's), the trainer's own top-k
    of the same shape and dtype, one layer's ``int64`` targets, the per-token fallback tally (a
    bool and an ``int64`` running count per token), and the bounded temporaries of the chunked
    validation and metrics (16 bytes per chunked id).

Transport (``transport`` in ``--json``)
    Before the store, each sample's routing travels from the rollout engine to verl's agent-loop
    worker. For the step's longest sample, and for an SGLang engine's routing host buffer of
    ``kv_slots`` KV slots (one row per slot), the bytes each engine's form takes: SGLang's own
    ``int32`` rows and their base64 in ``meta_info``, the same with verl_r3's compact routing
    (``sglang_compact_dtype``), and the rows verl's rollout server hands on (``storage_dtype``,
    as vLLM returns them).

Figures (per layout)
    ``bytes_per_id``: bytes of routing stored per (token, layer, k) of the stored rows.
    ``store_over_unpadded``: the step's stored routing over its unpadded payload, the
    ``(n - 1) x L x K`` ids the engine returned for each sample at one byte each.
    ``rank_over_unpadded``: the largest over data-parallel ranks of what a rank holds during a
    call (its stored share, the copies its layout makes, one micro-batch's dense routing) over
    its samples' payload.
    ``peak_over_unpadded``: the larger of the two (target ``TARGET_PEAK``); ``bytes_per_id``'s
    target is ``TARGET_BYTES_PER_ID`` for models with at most 256 experts.
"""

from __future__ import annotations

import math
import os
import platform

import torch

__all__ = ["LAYOUTS", "TARGET_BYTES_PER_ID", "TARGET_PEAK", "draw_lengths", "run"]

TARGET_BYTES_PER_ID = 1.0
TARGET_PEAK = 1.25
LAYOUTS = ("verl_padded", "verl", "verl_r3")


def draw_lengths(samples: int, *, prompt_min: int, prompt_max: int, response_median: float, response_sigma: float,
                 max_response: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, response) lengths like a long chain-of-thought run: prompts uniform in
    ``[prompt_min, prompt_max]``, responses log-normal around ``response_median``, cut at
    ``max_response`` (the truncated ones pile up there, as in a real run)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 1 <= prompt_min <= prompt_max:
        raise ValueError(f"need 1 <= prompt_min <= prompt_max, got {prompt_min}, {prompt_max}")
    if not (math.isfinite(response_median) and response_median >= 1 and math.isfinite(response_sigma)
            and response_sigma >= 0 and max_response >= 1):
        raise ValueError("response_median and max_response must be >= 1 and response_sigma >= 0, all finite; got "
                         f"{response_median}, {max_response} and {response_sigma}")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(prompt_min, prompt_max + 1, (samples,), generator=g)
    responses = (math.log(response_median) + response_sigma * torch.randn(samples, generator=g)).exp()
    responses = responses.round().clamp(1, max_response).long()
    return list(zip(prompts.tolist(), responses.tolist()))


def _carried_dtype(layout: str, experts: int) -> torch.dtype:
    """The dtype a layout stores: verl's int16, or what ``compact_rows`` picks for real ids of this
    model (its largest id included)."""
    if layout != "verl_r3":
        return torch.int16
    from verl_r3.core.record import compact_rows

    ids = torch.arange(experts, dtype=torch.int32).view(-1, 1, 1)
    return compact_rows(ids).dtype


def _micro_batches(lengths: list[int], max_token_len: int) -> list[list[int]]:
    """verl's dynamic-batch partition of one rank's sequences (lengths n), as index lists."""
    from verl.utils.seqlen_balancing import ceildiv, get_seqlen_balanced_partitions

    if max(lengths) > max_token_len:
        raise ValueError(f"max_token_len {max_token_len} is below the longest sequence ({max(lengths)} tokens); "
                         "verl refuses that too")
    count = min(len(lengths), ceildiv(sum(lengths), max_token_len))
    return get_seqlen_balanced_partitions(lengths, count, equal_size=False)


def _micro_batch_bytes(lengths: list[int], layers: int, top_k: int, dtype: torch.dtype, experts: int,
                       narrow: bool) -> int:
    """Routing held while one micro-batch of these sequence lengths runs (remove-padding layout):
    ``micro_batch_routing``'s output (the replayed routing), the trainer's own top-k that
    ``RouterReplay`` writes into one tensor of the same shape, one layer's ``int64`` targets, the
    fallback tally per token, and the bound on the chunked temporaries of validation and metrics."""
    from verl_r3.core import record
    from verl_r3.integration import step_metrics
    from verl_r3.integration.fsdp_replay import micro_batch_routing, replay_dtype

    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    total = int(offsets[-1])
    # One micro-batch is small (tens of MB at the defaults): it is built for real (ids 0).
    routed = torch.nested.nested_tensor_from_jagged(torch.zeros((total, layers, top_k), dtype=dtype), offsets=offsets)
    ids = torch.nested.nested_tensor_from_jagged(torch.empty((total,), dtype=torch.long), offsets=offsets)
    dense = micro_batch_routing(routed, ids, remove_padding=True, pad_size=0,
                                dtype=replay_dtype(dtype, experts, top_k) if narrow else None)
    native = dense.nbytes  # RouterReplay writes the trainer's top-k in the replayed routing's dtype
    layer_targets = _nbytes((total, top_k), torch.long) + _nbytes((total,), torch.bool)
    tally = _nbytes((total,), torch.bool) + _nbytes((total + 1,), torch.long)
    # Each chunked id costs at most 16 bytes of temporaries (a sort's int64 indices and values, masks).
    chunks = 16 * max(record._VALIDATE_CHUNK_IDS, step_metrics._CHUNK_IDS)
    return dense.nbytes + native + layer_targets + tally + chunks


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return torch.empty(shape, dtype=dtype, device="meta").nbytes


def _layout(layout: str, samples: list[tuple[int, int]], *, layers: int, top_k: int, experts: int, dp: int,
            max_prompt: int, max_response: int, max_token_len: int, mini_batches: int) -> dict:
    ids_per_row = layers * top_k
    dtype = _carried_dtype(layout, experts)
    n = [p + r for p, r in samples]
    payload = sum(x - 1 for x in n) * ids_per_row  # bytes at one byte per id
    if layout == "verl_padded":
        width = max_prompt + max_response
        stored = _nbytes((len(samples), width, layers, top_k), dtype)
        stored_ids = len(samples) * width * ids_per_row
    else:
        stored = sum(_nbytes((x, layers, top_k), dtype) for x in n)
        stored_ids = sum(n) * ids_per_row
    ranks = []
    for rank in range(dp):  # verl dispatches contiguous equal chunks of the (balanced) batch
        share = n[rank * len(n) // dp:(rank + 1) * len(n) // dp]
        if not share:
            continue
        rank_payload = sum(x - 1 for x in share) * ids_per_row
        blocks = sum(_nbytes((x, layers, top_k), dtype) for x in share)  # the rank's samples, jagged
        held = blocks
        if layout == "verl_padded":
            held += _nbytes((len(share), max_prompt + max_response, layers, top_k), dtype)  # and padded
        if layout != "verl_r3":
            held += blocks  # verl's engine splits every field into micro-batch copies up front
        held += blocks // mini_batches  # verl's worker copies the mini-batch an update runs on
        largest = max(_micro_batches(share, max_token_len), key=lambda part: sum(share[i] for i in part))
        micro = _micro_batch_bytes([share[i] for i in largest], layers, top_k, dtype, experts,
                                   narrow=layout == "verl_r3")
        ranks.append({"rank": rank, "samples": len(share), "held_bytes": held, "micro_batch_bytes": micro,
                      "payload_bytes": rank_payload, "over_unpadded": (held + micro) / rank_payload})
    worst = max(ranks, key=lambda r: r["over_unpadded"])
    store_ratio = stored / payload
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "stored_bytes": stored,
        "payload_bytes": payload,
        "bytes_per_id": stored / stored_ids,
        "store_over_unpadded": store_ratio,
        "rank_over_unpadded": worst["over_unpadded"],
        "worst_rank": worst,
        "peak_over_unpadded": max(store_ratio, worst["over_unpadded"]),
    }


def run(
    *,
    layers: int = 48,
    top_k: int = 8,
    experts: int = 128,
    prompts: int = 256,
    n: int = 8,
    dp: int = 16,
    max_prompt: int = 2048,
    max_response: int = 30720,
    max_token_len: int = 34816,
    mini_batches: int = 8,
    prompt_min: int = 64,
    prompt_max: int = 512,
    response_median: float = 6000.0,
    response_sigma: float = 0.8,
    seed: int = 0,
    lengths: list[tuple[int, int]] | None = None,
    kv_slots: int = 1_000_000,
) -> dict:
    """Routing memory of one step in each layout; see the module docstring. The defaults are a
    Qwen3-30B-A3B step of the math recipe (48 layers, 128 experts, top-8; 256 prompts x 8 samples;
    prompts up to 2048 and responses up to 30720 tokens; 34816 tokens per micro-batch; 16 ranks),
    with an SGLang engine of ``kv_slots`` KV slots for ``transport``."""
    if layers < 1 or top_k < 1 or experts < top_k:
        raise ValueError(f"need layers >= 1 and 1 <= top_k <= experts, got {layers}, {top_k}, {experts}")
    if dp < 1 or prompts < 1 or n < 1 or mini_batches < 1 or kv_slots < 1:
        raise ValueError(f"dp, prompts, n, mini_batches and kv_slots must be >= 1, got {dp}, {prompts}, {n}, "
                         f"{mini_batches}, {kv_slots}")
    if lengths is None:
        prompt_max = min(prompt_max, max_prompt)
        samples = draw_lengths(prompts * n, prompt_min=min(prompt_min, prompt_max), prompt_max=prompt_max,
                               response_median=response_median, response_sigma=response_sigma,
                               max_response=max_response, seed=seed)
    else:
        samples = [(int(p), int(r)) for p, r in lengths]
        bad = [i for i, (p, r) in enumerate(samples) if p < 1 or r < 1 or p > max_prompt or r > max_response]
        if bad:
            p, r = samples[bad[0]]
            raise ValueError(f"sample {bad[0]}: lengths ({p}, {r}) outside [1, {max_prompt}] x [1, {max_response}]")
    responses = sorted(r for _, r in samples)
    result = {
        "benchmark": "memory",
        "machine": {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "shape": {"layers": layers, "top_k": top_k, "experts": experts, "samples": len(samples), "dp": dp,
                  "max_prompt": max_prompt, "max_response": max_response, "max_token_len": max_token_len,
                  "mini_batches": mini_batches},
        "lengths": {"tokens": sum(p + r for p, r in samples),
                    "response_median": responses[len(responses) // 2],
                    "response_truncated_frac": sum(r == max_response for r in responses) / len(responses),
                    "prompt_mean": sum(p for p, _ in samples) / len(samples)},
        "targets": {"bytes_per_id": TARGET_BYTES_PER_ID, "peak_over_unpadded": TARGET_PEAK},
        "layouts": {},
    }
    for layout in LAYOUTS:
        result["layouts"][layout] = _layout(layout, samples, layers=layers, top_k=top_k, experts=experts, dp=dp,
                                            max_prompt=max_prompt, max_response=max_response,
                                            max_token_len=max_token_len, mini_batches=mini_batches)
    result["transport"] = transport(layers=layers, top_k=top_k, experts=experts, kv_slots=kv_slots,
                                    tokens=max(p + r for p, r in samples))
    ours = result["layouts"]["verl_r3"]
    result["bytes_per_id"] = ours["bytes_per_id"]
    result["peak_over_unpadded"] = ours["peak_over_unpadded"]
    result["within_target"] = (ours["peak_over_unpadded"] <= TARGET_PEAK
                               and (experts > 256 or ours["bytes_per_id"] <= TARGET_BYTES_PER_ID))
    return result


def _base64_bytes(nbytes: int) -> int:
    return 4 * math.ceil(nbytes / 3)


def transport(*, layers: int, top_k: int, experts: int, tokens: int, kv_slots: int) -> dict:
    """Bytes of one sample's routing (``tokens - 1`` rows) in each engine's form, and of an SGLang
    routing host buffer of ``kv_slots`` rows; see the module docstring."""
    from verl_r3.core.formats import sglang_compact_dtype
    from verl_r3.core.record import storage_dtype

    ids = max(tokens - 1, 0) * layers * top_k
    slots = kv_slots * layers * top_k
    compact = sglang_compact_dtype(experts) or torch.int32
    forms = {"sglang": torch.int32, "sglang_compact": compact, "server": storage_dtype(experts)}
    out = {"tokens": tokens, "kv_slots": kv_slots, "forms": {}}
    for name, dtype in forms.items():
        width = dtype.itemsize
        form = {"dtype": str(dtype).removeprefix("torch."), "bytes_per_id": width, "sample_bytes": ids * width}
        if name != "server":  # SGLang's forms: base64 in meta_info, and the host buffer
            form["base64_bytes"] = _base64_bytes(ids * width)
            form["host_buffer_bytes"] = slots * width
        out["forms"][name] = form
    return out


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def format_result(result: dict) -> str:
    s, n, m = result["shape"], result["lengths"], result["machine"]
    lines = [
        "verl-r3 bench memory: routing of one training step, by layout (sizes from shapes; nothing of the step allocated)",
        f"shape    {s['layers']} layers, {s['experts']} experts, top-{s['top_k']}; {s['samples']} samples on {s['dp']} "
        f"data-parallel ranks; prompts <= {s['max_prompt']}, responses <= {s['max_response']}; "
        f"{s['max_token_len']} tokens per micro-batch",
        f"lengths  {n['tokens']} tokens; mean prompt {n['prompt_mean']:.0f}, median response {n['response_median']}, "
        f"{100 * n['response_truncated_frac']:.1f}% of responses cut at the maximum",
        f"machine  {m['machine']}, {m['cpu_count']} CPUs, torch {m['torch']}",
        f"  {'layout':<12}{'dtype':>7}{'stored':>12}{'bytes/id':>10}{'store/unpadded':>16}{'rank/unpadded':>15}"
        f"{'peak/unpadded':>15}",
    ]
    for name, lay in result["layouts"].items():
        lines.append(f"  {name:<12}{lay['dtype']:>7}{_gib(lay['stored_bytes']):>12}{lay['bytes_per_id']:10.2f}"
                     f"{lay['store_over_unpadded']:16.3f}{lay['rank_over_unpadded']:15.3f}{lay['peak_over_unpadded']:15.3f}")
    ours = result["layouts"]["verl_r3"]
    lines.append(f"payload  {_gib(ours['payload_bytes'])} unpadded (one byte per id the engine returned)")
    tr = result["transport"]
    lines.append(f"transport  routing of the longest sample ({tr['tokens']} tokens) on its way to the agent-loop worker, "
                 f"and an SGLang engine's routing host buffer ({tr['kv_slots']} KV slots):")
    lines.append(f"  {'form':<16}{'dtype':>7}{'bytes/id':>10}{'sample':>11}{'base64':>11}{'host buffer':>13}")
    labels = {"sglang": "SGLang", "sglang_compact": "SGLang compact", "server": "server -> loop"}
    for name, form in tr["forms"].items():
        b64 = f"{form['base64_bytes'] / 1e6:.1f} MB" if "base64_bytes" in form else "-"
        host = _gib(form["host_buffer_bytes"]) if "host_buffer_bytes" in form else "-"
        lines.append(f"  {labels[name]:<16}{form['dtype']:>7}{form['bytes_per_id']:10d}"
                     f"{form['sample_bytes'] / 1e6:8.1f} MB{b64:>11}{host:>13}")
    verdict = "within" if result["within_target"] else "ABOVE"
    t = result["targets"]
    lines.append(f"verl_r3  bytes_per_id {result['bytes_per_id']:.3f} (target {t['bytes_per_id']}), peak_over_unpadded "
                 f"{result['peak_over_unpadded']:.3f} (target <= {t['peak_over_unpadded']}): {verdict}")
    return "\n".join(lines)
