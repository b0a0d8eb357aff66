"""Runs inside the SGLang environment (scripts/sglang_env.sh) for test_sglang_capture.py.

Usage: python sglang_capture_driver.py SPEC_JSON. Writes one JSON object to stdout (the last
line); SGLang's own logs go to stderr. With the checkout on PYTHONPATH.

SPEC_JSON holds ``model`` (a model directory), ``checks`` (a list of "patch", "compact", "weight_sync",
"verl_server", "capture") and,
for "capture": ``engine_args`` (extra ``sglang.Engine`` arguments), ``compact_routing`` (``start_cpu_engine``'s,
default true), ``prefix`` / ``tails`` / ``prefix_new_tokens`` (two
requests sharing a long prefix, sent one after the other) and ``prompts`` /
``max_new_tokens`` / ``ignore_eos`` / ``n`` (one concurrent batch with parallel sampling).
"""

from __future__ import annotations

import json
import sys
import time


def patch_checks() -> dict:
    """apply()/revert() of sglang_cpu_0_5 against the installed SGLang, before any engine starts."""
    import torch

    from verl_r3.engines.sglang_engine import cpu_patch

    patch = cpu_patch()
    from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
    from sglang.srt.mem_cache.pool_host import common
    from sglang.srt.models.deepseek_common import attention_backend_handler as mla

    def mla_handler():
        """What a latent attention layer on the torch-native backend gets for a fresh prefill."""
        handler = mla.AttentionBackendRegistry.get_handler("torch_native")
        if handler is patch.absorbed_mla_on_torch_native:
            return ("patch", handler(None, None).name)
        return ("sglang", handler.__name__)

    def rotary():
        return RotaryEmbedding(32, 32, 64, 10000, True, torch.float32)

    def rotary_error():
        try:
            rotary()
        except ImportError as exc:
            return repr(exc)
        return None

    out = {"vllm_installed": patch.vllm_installed(), "before_cpu_entry": "cpu" in common.ALLOC_MEMORY_FUNCS,
           "before_rotary_error": rotary_error(), "before_mla_handler": mla_handler()}
    out["apply"] = [patch.apply(), patch.apply()]
    out["applied_cpu_entry_is_patch"] = common.ALLOC_MEMORY_FUNCS.get("cpu") is patch.alloc_host_unpinned
    emb = rotary()
    out["applied_rotary_ok"] = bool(emb.cos_sin_cache.shape[0] == 64)
    out["applied_mla_handler"] = mla_handler()
    out["vllm_left_in_sys_modules"] = "vllm" in sys.modules or "vllm._custom_ops" in sys.modules
    buf = common.ALLOC_MEMORY_FUNCS["cpu"]((3, 4, 2), dtype=torch.int32, device="cpu", pin_memory=True,
                                           allocator=common.HostTensorAllocator())
    out["alloc_shape"] = list(buf.shape)
    out["alloc_pinned"] = bool(buf.is_pinned())
    out["revert"] = [patch.revert(), patch.revert()]
    out["after_cpu_entry"] = "cpu" in common.ALLOC_MEMORY_FUNCS
    out["after_rotary_error"] = rotary_error()
    out["after_mla_handler"] = mla_handler()
    return out


def compact_checks() -> dict:
    """apply()/revert() of sglang_compact_routing_0_5 against the installed SGLang: which module's
    functions the routed-experts capturer runs."""
    from sglang.srt.state_capturer.routed_experts import RoutedExpertsCapturer

    from verl_r3.engines.sglang_engine import compact_routing_patch

    patch = compact_routing_patch()

    def owners():
        return [RoutedExpertsCapturer.__init__.__module__, RoutedExpertsCapturer._get_local_slice.__module__]

    out = {"before": owners(), "apply": [patch.apply(), patch.apply()], "applied": owners()}
    out["revert"] = [patch.revert(), patch.revert()]
    out["after"] = owners()
    return out


def weight_sync_checks() -> dict:
    """sglang_cpu_weight_sync_0_5: a CPU tensor survives SGLang's patched reducers only with the patch."""
    import io
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

    from verl_r3.patches import sglang_cpu_weight_sync_0_5 as patch

    monkey_patch_torch_reductions()  # what SGLang's update_weights does before pickling
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4)

    def round_trip():
        buf = io.BytesIO()
        try:
            ForkingPickler(buf).dump(tensor)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return repr(exc)
        return bool(torch.equal(pickle.loads(buf.getvalue()), tensor))

    out = {"before": round_trip(), "apply": [patch.apply(), patch.apply()],
           "strategy": torch.multiprocessing.get_sharing_strategy()}
    out["applied"] = round_trip()
    out["revert"] = [patch.revert(), patch.revert()]
    out["after"] = round_trip()
    out["strategy_after"] = torch.multiprocessing.get_sharing_strategy()
    return out


def verl_server_checks() -> dict:
    """verl_sglang_server_0_9 against the installed verl and SGLang."""
    import base64

    import numpy as np
    from sglang.srt.server_args import ServerArgs
    from verl.workers.rollout.sglang_rollout import async_sglang_server, http_server_engine

    from verl_r3.patches import verl_sglang_server_0_9 as patch

    def adapter_error():
        try:
            http_server_engine.AsyncHttpServerAdapter(model_path="x", host="127.0.0.1", port=1, launch_server=False)
        except TypeError as exc:
            return repr(exc)
        return None

    out = {"adapter_before": adapter_error(), "apply": [patch.apply(), patch.apply()]}
    out["adapter_applied"] = adapter_error()
    names = [f.name for f in async_sglang_server.dataclasses.fields(ServerArgs)]
    out["server_args_fields"] = "enable_weights_cpu_backup" in names
    ids = np.arange(2 * 3 * 2, dtype="<i4")

    def decoded(values, num_experts, dtype="<i4", start=0):
        # Two rows: a prompt of 2 tokens and 1 generated, or more prompt tokens and a later start.
        meta = {"id": "req-7", "prompt_tokens": 2 + start, "completion_tokens": 1,
                "routed_experts": base64.b64encode(np.asarray(values).astype(dtype).tobytes()).decode()}
        try:
            arrived = patch.decode_routed_experts(meta, 3, 2, num_experts, start=start)
        except ValueError as exc:
            return str(exc)
        return str(meta["routed_experts"].dtype), meta["routed_experts"].tolist(), str(arrived)

    out["decoded"] = decoded(ids, None)
    out["decoded_narrow"] = {str(e): decoded(ids, e) for e in (12, 256, 300)}
    out["decoded_wide_id"] = decoded(np.r_[ids[:-1], 299], 300)
    # What sglang_compact_routing_0_5 sends: one byte per id (two above 255 experts).
    out["decoded_compact"] = [decoded(ids, 12, "<u1"), decoded(ids, None, "<u1", start=5), decoded(ids, 300, "<i2")]
    out["decoded_bad"] = [decoded(np.r_[ids[:-1], 12], 12), decoded(np.r_[-1, ids[1:]], 12),
                          decoded(np.r_[-1, ids[1:]], 12, "<u1"), decoded(np.r_[-1, ids[1:]], 300, "<i2")]
    for encoded in ("AAAA*", base64.b64encode(ids[:-1].tobytes()).decode()):
        meta = {"id": "req-8", "prompt_tokens": 2, "completion_tokens": 1, "routed_experts": encoded}
        try:
            patch.decode_routed_experts(meta, 3, 2, 12)
        except ValueError as exc:
            out["decoded_bad"].append(str(exc))
    try:  # SGLang's meta_info always has the token counts; without them the rows are unknown
        patch.decode_routed_experts({"id": "req-9", "routed_experts": base64.b64encode(ids.tobytes()).decode()}, 3, 2)
    except ValueError as exc:
        out["decoded_bad"].append(str(exc))
    from transformers import AutoConfig

    moe = AutoConfig.for_model("qwen3_moe", num_hidden_layers=3, num_experts=12, num_experts_per_tok=2)
    out["num_experts"] = [patch._num_experts(moe), patch._num_experts(AutoConfig.for_model("llama"))]
    import asyncio
    import types

    def launch(routing_replay, skip_tokenizer_init):
        config = types.SimpleNamespace(enable_rollout_routing_replay=routing_replay,
                                       skip_tokenizer_init=skip_tokenizer_init)
        try:  # the refusal comes before verl's launch_server, which needs a real server object
            asyncio.run(async_sglang_server.SGLangHttpServer.launch_server(types.SimpleNamespace(config=config)))
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    out["launch"] = [launch(True, False), launch(False, False)]
    out["revert"] = [patch.revert(), patch.revert()]
    out["adapter_after"] = adapter_error()
    return out


def capture(spec: dict) -> dict:
    from verl_r3.engines.sglang_engine import start_cpu_engine

    t0 = time.monotonic()
    engine = start_cpu_engine(spec["model"], compact_routing=spec.get("compact_routing", True),
                              **{"random_seed": 0, "log_level": "warning", **spec["engine_args"]})
    started = time.monotonic() - t0
    try:
        def request(ids, params):
            return engine.generate(input_ids=ids, sampling_params=params, return_routed_experts=True)

        def keep(prompt, out):
            meta = out["meta_info"]
            return {"prompt": prompt, "output_ids": out["output_ids"], "routed_experts": meta["routed_experts"],
                    "cached_tokens": meta["cached_tokens"], "num_retractions": meta["num_retractions"],
                    "prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
                    "finish_reason": meta["finish_reason"]}

        prefix_runs = []
        for tail in spec["tails"]:  # one after the other: the second finds the first's prefix cached
            prompt = spec["prefix"] + tail
            params = {"max_new_tokens": spec["prefix_new_tokens"], "temperature": 1.0, "ignore_eos": True}
            prefix_runs.append(keep(prompt, request([prompt], [params])[0]))
        t1 = time.monotonic()
        prompts, n = spec["prompts"], spec["n"]
        params = [{"max_new_tokens": m, "n": n, "temperature": 1.0, "ignore_eos": e}
                  for m, e in zip(spec["max_new_tokens"], spec["ignore_eos"])]
        outs = request(prompts, params)
        batch_s = time.monotonic() - t1
        # SGLang returns the n samples of prompt i at positions n*i .. n*i + n - 1.
        batch = [keep(prompts[j // n], out) for j, out in enumerate(outs)]
    finally:
        engine.shutdown()
    return {"prefix": prefix_runs, "batch": batch, "engine_start_s": started, "batch_s": batch_s}


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    result = {}
    if "patch" in spec["checks"]:
        result["patch"] = patch_checks()
    if "compact" in spec["checks"]:
        result["compact"] = compact_checks()
    if "weight_sync" in spec["checks"]:
        result["weight_sync"] = weight_sync_checks()
    if "verl_server" in spec["checks"]:
        result["verl_server"] = verl_server_checks()
    if "capture" in spec["checks"]:
        result["capture"] = capture(spec)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
