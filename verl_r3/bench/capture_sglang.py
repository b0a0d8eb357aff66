"""Cost of SGLang's native routing capture: generation throughput with and without it.

Runs in the SGLang environment (``scripts/sglang_env.sh``) with the checkout on ``PYTHONPATH``::

    PYTHONPATH=. $(bash scripts/sglang_env.sh)/bin/python -m verl_r3.bench.capture_sglang --json

Two engines on the same tiny randomly initialised Qwen3-MoE (built here from a config, fp32 by
default), both on the CPU through ``verl_r3.engines.sglang_engine.start_cpu_engine``:

* ``capture``: ``enable_return_routed_experts=True``, every request with
  ``return_routed_experts=True`` (SGLang records the top-k of every layer, gathers each
  request's rows from its host buffer and returns them base64-encoded), with verl_r3's compact
  routing (``start_cpu_engine``'s default: one byte per id inside SGLang) unless
  ``int32_routing`` (``--int32-routing``); ``shape["routing_bytes_per_id"]`` is the width SGLang sent;
* ``plain``: neither;
* ``control`` (``--control``): a second engine without capture, timed in the same rounds
  (``control_ratio = control / plain``: how far apart two identical engines land here).

Each round sends a batch of new prompts (``prompts`` prompts of ``prompt_len`` random tokens,
``new_tokens`` tokens each, ``ignore_eos``; ``verl_r3.bench.capture.batches``) to each engine in
turn, the order reversed every other round, after one untimed warm-up round each. Throughput is
generated tokens / wall time of the ``generate`` call; the result
(``verl_r3.bench.capture.summary``, as for the other engines) reports every round, the medians
over ``rounds`` and ``ratio = capture / plain`` (1.0 = no cost). Idle engines sleep
(``sleep_on_idle``) so they do not take the cores from the one being timed. Every captured routing is decoded into a
``RoutingRecord`` and its row count checked, so the capture is real, not just enabled.
"""

from __future__ import annotations

import argparse
import base64
import json
import platform
import signal
import sys
import tempfile
import time

__all__ = ["run"]

from verl_r3.bench import capture as shared  # noqa: E402  (model and machine, as for the other engines)


def _machine() -> dict:
    import sglang

    return shared.machine(system=platform.system(), python=platform.python_version(), sglang=sglang.__version__)


def run(*, rounds: int = 5, prompts: int = 32, prompt_len: int = 64, new_tokens: int = 64, layers: int = 4,
        experts: int = 8, top_k: int = 2, hidden: int = 128, dtype: str = "float32", seed: int = 0,
        control: bool = False, int32_routing: bool = False) -> dict:
    """Measure and return the result dict (see the module docstring)."""
    for name, value in (("rounds", rounds), ("prompts", prompts), ("prompt_len", prompt_len),
                        ("new_tokens", new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    from verl_r3.engines.sglang_engine import routing_record, start_cpu_engine

    rounds_batches = shared.batches(seed, rounds, prompts, prompt_len)  # new prompts each round, as in the others
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    pool = prompts * (prompt_len + new_tokens) + 256
    with tempfile.TemporaryDirectory() as model_dir:
        shared.build_model(model_dir, layers=layers, experts=experts, top_k=top_k, hidden=hidden, seed=seed)
        sides = ["capture", "plain"] + (["control"] if control else [])
        engines = {}
        try:
            for name in sides:
                engines[name] = start_cpu_engine(model_dir, dtype=dtype, capture=name == "capture",
                                                 compact_routing=not int32_routing, max_total_tokens=pool,
                                                 sleep_on_idle=True, random_seed=seed, log_level="warning")
            widths = set()

            def one(name: str, k: int) -> float:
                capture = name == "capture"
                t0 = time.perf_counter()
                outs = engines[name].generate(input_ids=rounds_batches[k], sampling_params=params,
                                              return_routed_experts=capture)
                elapsed = time.perf_counter() - t0
                generated = sum(len(o["output_ids"]) for o in outs)
                if generated != prompts * new_tokens:
                    raise RuntimeError(f"{name}: {generated} tokens generated, expected {prompts * new_tokens}")
                if capture:
                    for i, o in enumerate(outs):
                        rec = routing_record(o["meta_info"], num_layers=layers, top_k=top_k, num_experts=experts,
                                             sample=i)
                        if rec.rows != prompt_len + new_tokens - 1:
                            raise RuntimeError(f"capture: sample {i} has {rec.rows} routing rows, expected "
                                               f"{prompt_len + new_tokens - 1}")
                        sent = len(base64.b64decode(o["meta_info"]["routed_experts"]))
                        widths.add(sent // (rec.rows * layers * top_k))
                return generated / elapsed

            runs = shared.interleave(sides, rounds, one)
        finally:
            for engine in engines.values():
                engine.shutdown()
    shape = {"prompts": prompts, "prompt_len": prompt_len, "new_tokens": new_tokens, "layers": layers,
             "experts": experts, "top_k": top_k, "hidden": hidden, "dtype": dtype,
             "routing_bytes_per_id": sorted(widths)}
    return shared.summary("sglang", runs, shape, _machine())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl_r3.bench.capture_sglang", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size, a multiple of 32")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", action="store_true", help="time a second engine without capture too")
    parser.add_argument("--int32-routing", action="store_true",
                        help="capture with SGLang's own int32 routing instead of verl_r3's compact routing")
    parser.add_argument("--timeout", type=int, default=900, help="seconds before the run gives up (default 900)")
    args = parser.parse_args(argv)

    def give_up(signum, frame):
        raise TimeoutError(f"SGLang capture benchmark exceeded --timeout {args.timeout} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(args.timeout)
    try:
        result = run(rounds=args.rounds, prompts=args.prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                     layers=args.layers, experts=args.experts, top_k=args.top_k, hidden=args.hidden,
                     dtype=args.dtype, seed=args.seed, control=args.control, int32_routing=args.int32_routing)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"capture_sglang: error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    if args.json:
        print(json.dumps(result))
    else:
        print(shared.format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
