"""``verl-r3``: the console entry point.

    verl-r3 demo [--quick] [--seed N]          alias of `verl-r3 diagnose --demo` (verl_r3.demo)
    verl-r3 bench replay [--json] [options]    replay overhead on forward + backward (verl_r3.bench.replay)
    verl-r3 bench capture --engine E [--json]  rollout throughput with vs without capture (verl_r3.bench.capture);
                                               hf, vllm: --stages times each routing stage (vllm: in its processes)
    verl-r3 bench commit [--json] [options]    vLLM CPU patch: the worker's per-step routing commit (verl_r3.bench.vllm_commit)
    verl-r3 bench front-end [--json] [options] vLLM's front end: routing kept alive per request (verl_r3.bench.front_end)
    verl-r3 bench startup [--json] [options]   what loading verl_r3 adds to each verl process's `import verl` (verl_r3.bench.startup)
    verl-r3 bench memory [--json] [options]    routing bytes per id and peak over the unpadded payload (verl_r3.bench.memory)
    verl-r3 bench e2e [--json] [options]       seconds per quickstart step, GRPO+R3 vs GRPO (verl_r3.bench.e2e)
    verl-r3 doctor [--json]                    versions, and each engine's capture path (verl_r3.doctor)
    verl-r3 stress --engine E [--requests N] [--json]
                                               concurrent requests with capture and aborts, every routing
                                               row checked against a single-request forward (verl_r3.stress)
    verl-r3 diagnose (--demo | --model DIR) --out DIR
                                               training-inference mismatch with and without R3 (verl_r3.diagnose)
    verl-r3 report RUN_DIR... --out DIR        compare runs from W&B offline dirs or verl .jsonl files (verl_r3.report)
    verl-r3 wandb-dashboard --entity E --project P [--group G] [--dry-run [--json]]
                                               a saved W&B workspace comparing runs (verl_r3.wandb_dashboard)
    verl-r3 --version

Subcommands import their heavy modules (torch models, transformers, matplotlib, wandb) only
when they run, so ``verl-r3 --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from verl_r3 import __version__
from verl_r3.argtypes import non_negative_int, positive_int, positive_seconds

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verl-r3", description="Rollout Routing Replay (R3) for Mixture-of-Experts RL with verl."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="alias of `diagnose --demo`",
                               description="An alias of `verl-r3 diagnose --demo` (verl_r3.demo).")
    demo.add_argument("--out", default=None, help="output directory (default runs/diagnose-demo)")
    demo.add_argument("--quick", action="store_true", help="a shorter smoke run, too small to show the mismatch well")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_demo)

    bench = commands.add_parser("bench", help="benchmarks", description="Benchmarks of verl_r3.")
    benches = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    replay = benches.add_parser(
        "replay",
        help="forward+backward time, native vs replayed routing",
        description="Time forward + backward of a Qwen3-MoE (fp32 on CPU by default; --device cuda for a GPU) "
        "with native routing and inside rr.replay(own routing), interleaved; report the medians and their "
        "ratio (target <= 1.02) and check that the replayed losses equal the native ones bit for bit.",
    )
    replay.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    replay.add_argument("--repeats", type=positive_int, default=5, help="timed rounds (default 5)")
    replay.add_argument("--warmup", type=non_negative_int, default=1, help="untimed rounds first (default 1)")
    replay.add_argument("--tokens", type=positive_int, default=4096, help="tokens per step (default 4096)")
    replay.add_argument("--batch", type=positive_int, default=4, help="sequences per step (default 4)")
    replay.add_argument("--layers", type=positive_int, default=8, help="decoder layers, all MoE (default 8)")
    replay.add_argument("--experts", type=positive_int, default=64, help="routed experts (default 64)")
    replay.add_argument("--top-k", type=positive_int, default=8, help="experts per token (default 8)")
    replay.add_argument("--hidden", type=positive_int, default=None,
                        help="hidden size, a multiple of 64 (default: the benchmark's)")
    replay.add_argument("--moe-intermediate", type=positive_int, default=None,
                        help="expert intermediate size (default: the benchmark's)")
    replay.add_argument("--remove-padding", action="store_true",
                        help="pack the sequences into one row with restarting position ids, as verl's "
                        "use_remove_padding does")
    replay.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (default cpu); on CUDA each timed step is synchronized")
    replay.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the model's dtype (default float32)")
    replay.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    replay.add_argument("--threads", type=non_negative_int, default=1,
                        help="torch threads (default 1: steadier timings; 0 keeps torch's default)")
    replay.set_defaults(func=_bench_replay)

    capture = benches.add_parser(
        "capture",
        help="rollout throughput with vs without routing capture",
        description="Generation throughput of a rollout engine with and without routing capture on a tiny "
        "Qwen3-MoE, interleaved round by round; report the medians and their ratio (target >= 0.99).",
    )
    capture.add_argument("--engine", required=True, choices=("hf", "vllm", "sglang"), help="rollout engine")
    capture.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    capture.add_argument("--rounds", type=positive_int, default=5, help="timed rounds per side (default 5)")
    capture.add_argument("--prompts", type=positive_int, default=32, help="prompts per batch (default 32)")
    capture.add_argument("--prompt-len", type=positive_int, default=64, help="prompt tokens (default 64)")
    capture.add_argument("--new-tokens", type=positive_int, default=64, help="generated tokens each (default 64)")
    capture.add_argument("--layers", type=positive_int, default=4, help="decoder layers, all MoE (default 4)")
    capture.add_argument("--experts", type=positive_int, default=8, help="routed experts (default 8)")
    capture.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default 2)")
    capture.add_argument("--hidden", type=positive_int, default=128, help="hidden size (default 128)")
    capture.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="engine dtype")
    capture.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    capture.add_argument("--control", action="store_true",
                         help="also time a second instance without capture: control / plain is how far "
                              "two identical sides land apart on this machine")
    capture.add_argument("--no-pin", action="store_true",
                         help="vllm: leave the front end and engine cores where the OS puts them (by default they "
                              "are pinned to the CPUs vLLM reserves for them, off its workers' cores)")
    capture.add_argument("--stages", action="store_true",
                         help="hf, vllm: also time each routing stage (vllm: inside the engines' own processes, "
                              "every side beside the others; hf: the capturing generator's hooks and its cut of "
                              "the batch's routing) and print its microseconds per step, and what the routing "
                              "stages weigh against the plain engine's step")
    capture.add_argument("--int32-routing", action="store_true",
                         help="sglang: capture with SGLang's own int32 routing instead of verl_r3's compact routing "
                              "(one byte per id inside SGLang)")
    capture.set_defaults(func=_bench_capture)

    commit = benches.add_parser(
        "commit",
        help="vLLM CPU patch: the worker's per-step routing commit, vLLM's process_output vs StepCommit",
        description="The per-step routing commit of the vLLM CPU capture patch, timed outside an engine: two "
        "copies of vLLM's worker-side routing connector follow one decode schedule, one committing through "
        "vLLM's process_output, the other through StepCommit; medians of microseconds per decode step and "
        "their ratio, and whether every step's outputs were equal.",
    )
    commit.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    commit.add_argument("--requests", type=positive_int, default=32, help="requests decoding together (default 32)")
    commit.add_argument("--prompt-len", type=positive_int, default=64, help="prompt tokens (default 64)")
    commit.add_argument("--new-tokens", type=positive_int, default=64, help="generated tokens each (default 64)")
    commit.add_argument("--layers", type=positive_int, default=4, help="decoder layers (default 4)")
    commit.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default 2)")
    commit.add_argument("--experts", type=positive_int, default=8, help="routed experts, at most 256 (default 8)")
    commit.add_argument("--block-size", type=positive_int, default=32, help="tokens per routing block (default 32)")
    commit.add_argument("--repeats", type=positive_int, default=5, help="timed repeats (default 5)")
    commit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    commit.set_defaults(func=_bench_commit)

    front_end = benches.add_parser(
        "front-end",
        help="vLLM's front end: routing kept alive while requests run, vLLM's accumulation vs verl_r3's",
        description="One capturing vLLM engine on a tiny Qwen3-MoE serves batches with a long tail of lengths, "
        "with vLLM's own accumulation of each request's routing in its front end and with verl_r3's "
        "(vllm_front_end_routing_0_32): bytes kept alive for routing against the rows held, at the peak and at "
        "the tail of a round, whether both return the same routing, and the throughput and front-end CPU of "
        "interleaved rounds, medians and ratios.",
    )
    front_end.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    front_end.add_argument("--rounds", type=positive_int, default=5, help="timed rounds per side (default 5)")
    front_end.add_argument("--prompts", type=positive_int, default=32, help="prompts per batch (default 32)")
    front_end.add_argument("--prompt-len", type=positive_int, default=32, help="prompt tokens (default 32)")
    front_end.add_argument("--new-tokens", type=positive_int, default=192,
                           help="tokens the longest request generates; the others 1/16 to 1/2 of it (default 192)")
    front_end.add_argument("--layers", type=positive_int, default=4, help="decoder layers, all MoE (default 4)")
    front_end.add_argument("--experts", type=positive_int, default=8, help="routed experts (default 8)")
    front_end.add_argument("--top-k", type=positive_int, default=2, help="experts per token (default 2)")
    front_end.add_argument("--hidden", type=positive_int, default=128, help="hidden size (default 128)")
    front_end.add_argument("--interval-ms", type=float, default=20.0,
                           help="milliseconds between samples of the front end's requests (default 20)")
    front_end.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    front_end.set_defaults(func=_bench_front_end)

    startup = benches.add_parser(
        "startup",
        help="what loading verl_r3 adds to each verl process's `import verl`",
        description="Import a module (default verl) in fresh interpreters, without and with "
        "VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate, sides alternating; medians of the import's "
        "seconds, their ratio, the modules loaded, and whether verl's engines, rollouts or agent loops were.",
    )
    startup.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    startup.add_argument("--module", default="verl", help="module to import (default verl)")
    startup.add_argument("--repeats", type=positive_int, default=5, help="timed imports per side (default 5)")
    startup.add_argument("--cpu-platform", action="store_true", help="set VERL_PLATFORM=cpu on both sides")
    startup.set_defaults(func=_bench_startup)

    memory = benches.add_parser(
        "memory",
        help="routing memory of one training step: bytes per id, peak over the unpadded payload",
        description="Routing memory of one training step in verl's padded layout, verl's v1 layout and "
        "verl_r3's, from shapes (nothing of the step is allocated). The defaults are a Qwen3-30B-A3B step "
        "of the math recipe; targets: 1 byte per id, peak <= 1.25 x the unpadded payload.",
    )
    memory.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    memory.add_argument("--layers", type=positive_int, default=48, help="decoder layers (default 48)")
    memory.add_argument("--experts", type=positive_int, default=128, help="routed experts (default 128)")
    memory.add_argument("--top-k", type=positive_int, default=8, help="experts per token (default 8)")
    memory.add_argument("--prompts", type=positive_int, default=256, help="prompts per step (default 256)")
    memory.add_argument("--n", type=positive_int, default=8, help="samples per prompt (default 8)")
    memory.add_argument("--dp", type=positive_int, default=16, help="data-parallel ranks (default 16)")
    memory.add_argument("--max-prompt", type=positive_int, default=2048, help="max prompt tokens (default 2048)")
    memory.add_argument("--max-response", type=positive_int, default=30720, help="max response tokens (default 30720)")
    memory.add_argument("--max-token-len", type=positive_int, default=34816,
                        help="tokens per micro-batch, ppo_max_token_len_per_gpu (default 34816)")
    memory.add_argument("--response-median", type=float, default=6000.0,
                        help="median response tokens of the drawn lengths (default 6000)")
    memory.add_argument("--response-sigma", type=float, default=0.8,
                        help="log-normal spread of the response lengths (default 0.8)")
    memory.add_argument("--mini-batches", type=positive_int, default=8, help="PPO mini-batches per step (default 8)")
    memory.add_argument("--seed", type=int, default=0, help="random seed of the lengths (default 0)")
    memory.add_argument("--kv-slots", type=positive_int, default=1_000_000,
                        help="KV slots of the SGLang engine whose routing host buffer is sized (default 1000000)")
    memory.set_defaults(func=_bench_memory)

    e2e = benches.add_parser(
        "e2e",
        help="seconds per quickstart step, GRPO+R3 vs GRPO",
        description="verl's main_ppo on the CPU quickstart model, GRPO and GRPO+R3 with the same seeds, runs "
        "alternating; medians of verl's timing_s/step and the phase timings, ratio (target <= 1.03).",
    )
    e2e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e2e.add_argument("--runs", type=positive_int, default=2, help="runs per side (default 2)")
    e2e.add_argument("--steps", type=positive_int, default=8, help="steps per run (default 8)")
    e2e.add_argument("--skip", type=non_negative_int, default=2, help="warm-up steps left out of each run (default 2)")
    e2e.add_argument("--prompts", type=positive_int, default=8, help="prompts per step (default 8)")
    e2e.add_argument("--samples", type=positive_int, default=4, help="responses per prompt (default 4)")
    e2e.add_argument("--engine", default="vllm", choices=("vllm", "hf", "sglang"), help="rollout engine")
    e2e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e2e.add_argument("--out", default=None, help="directory for the runs (default: a new temporary one)")
    e2e.add_argument("--timeout", type=positive_seconds, default=900.0, help="seconds allowed per run (default 900)")
    e2e.add_argument("--warm-start-steps", type=non_negative_int, default=None,
                     help="the model's warm-start steps (default: the quickstart model's); fewer build it sooner")
    e2e.set_defaults(func=_bench_e2e)

    doctor = commands.add_parser("doctor", help="installed versions and each engine's routing capture path",
                                 description="Installed versions of verl, torch, transformers, vLLM and SGLang, "
                                 "and for each rollout engine whether routing capture is native, patched or "
                                 "unsupported (and why).")
    doctor.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    doctor.set_defaults(func=_doctor)

    stress = commands.add_parser(
        "stress",
        help="concurrent requests with routing capture and aborts, checked against single-request forwards",
        description="Send N concurrent requests of mixed lengths (some sharing a prefix) to a rollout engine with "
        "routing capture, abort every 8th after a few tokens, then send a follow-up request; compare every "
        "returned routing row, in every MoE layer, with a transformers fp32 forward of that sequence alone. "
        "Exit status 1 when a routing differs, an abort was not clean or a request failed (each named).",
    )
    stress.add_argument("--engine", required=True, choices=("hf", "vllm", "sglang"), help="rollout engine")
    stress.add_argument("--requests", type=positive_int, default=64, help="concurrent requests (default 64)")
    stress.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    stress.add_argument("--model", default=None,
                        help="Hugging Face MoE model directory to serve (default: a tiny fp32 Qwen3-MoE built here)")
    stress.add_argument("--seed", type=int, default=0, help="seed of the requests and the built model (default 0)")
    stress.add_argument("--timeout", type=positive_seconds, default=600.0,
                        help="seconds the engine may take before its processes are killed (default 600)")
    stress.set_defaults(func=_stress)

    for name, module, summary, description in _MODULE_COMMANDS:
        sub = commands.add_parser(name, help=summary, description=description)
        command = importlib.import_module(module)  # light: each imports its heavy parts when it runs
        command.add_arguments(sub)
        sub.set_defaults(func=command.main)
    return parser


# (subcommand, module with add_arguments(parser) and main(args) -> int, help, description)
_MODULE_COMMANDS = (
    ("diagnose", "verl_r3.diagnose", "training-inference mismatch of a model with and without R3, with plots",
     "Generate with routing capture, recompute the log-probs with the training stack (native routing, R3 "
     "replay, native again), and write metrics.json, the paper's plots and a table. --demo does it all on a "
     "tiny MoE it builds, on CPU."),
    ("report", "verl_r3.report", "compare runs: report.md, summary.json, curves.png from W&B offline runs or .jsonl",
     "Compare verl runs from W&B offline run directories or verl FileLogger .jsonl files: a markdown table "
     "(report.md), summary.json and curves.png, readable without a W&B account."),
    ("wandb-dashboard", "verl_r3.wandb_dashboard", "create a saved W&B workspace comparing R3 and baseline runs",
     "Create a saved W&B workspace (wandb-workspaces) with the comparison panels: reward, k3 KL, F(2), router "
     "disagreement per layer, replay and fallback fractions, step time; runs grouped by variant."),
)


def _demo(args: argparse.Namespace) -> int:
    from verl_r3 import demo  # lazy: builds models; an ImportError here means verl_r3.demo is missing

    result = demo.main(args)
    return result if isinstance(result, int) else 0


def _bench_replay(args: argparse.Namespace) -> int:
    from verl_r3.bench import replay

    kwargs = dict(layers=args.layers, experts=args.experts, top_k=args.top_k, tokens=args.tokens, batch=args.batch,
                  repeats=args.repeats, warmup=args.warmup, seed=args.seed, threads=args.threads or None,
                  remove_padding=args.remove_padding, device=args.device, dtype=args.dtype)
    if args.hidden is not None:
        kwargs["hidden"] = args.hidden
    if args.moe_intermediate is not None:
        kwargs["moe_intermediate"] = args.moe_intermediate
    try:
        result = replay.run(**kwargs)
    except ValueError as exc:
        print(f"verl-r3 bench replay: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(format_replay(result))
    return 0


def _bench_capture(args: argparse.Namespace) -> int:
    from verl_r3.bench import capture

    try:
        result = capture.run(args.engine, rounds=args.rounds, prompts=args.prompts, prompt_len=args.prompt_len,
                             new_tokens=args.new_tokens, layers=args.layers, experts=args.experts, top_k=args.top_k,
                             hidden=args.hidden, dtype=args.dtype, seed=args.seed, control=args.control,
                             pin=False if args.no_pin else None, stages=args.stages,
                             int32_routing=args.int32_routing)
    except (ValueError, RuntimeError) as exc:
        print(f"verl-r3 bench capture: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else capture.format_result(result))
    return 0


def _bench_commit(args: argparse.Namespace) -> int:
    from verl_r3.bench import vllm_commit

    try:
        result = vllm_commit.run(requests=args.requests, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                 layers=args.layers, top_k=args.top_k, experts=args.experts,
                                 block_size=args.block_size, repeats=args.repeats, seed=args.seed)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"verl-r3 bench commit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else vllm_commit.format_result(result))
    return 0


def _bench_front_end(args: argparse.Namespace) -> int:
    from verl_r3.bench import front_end

    try:
        result = front_end.run(rounds=args.rounds, prompts=args.prompts, prompt_len=args.prompt_len,
                               new_tokens=args.new_tokens, layers=args.layers, experts=args.experts,
                               top_k=args.top_k, hidden=args.hidden, interval_ms=args.interval_ms, seed=args.seed)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"verl-r3 bench front-end: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else front_end.format_result(result))
    return 0


def _bench_startup(args: argparse.Namespace) -> int:
    from verl_r3.bench import startup

    try:
        result = startup.run(module=args.module, repeats=args.repeats, cpu_platform=args.cpu_platform)
    except (ValueError, RuntimeError) as exc:
        print(f"verl-r3 bench startup: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else startup.format_result(result))
    return 0


def _bench_memory(args: argparse.Namespace) -> int:
    from verl_r3.bench import memory

    try:
        result = memory.run(layers=args.layers, experts=args.experts, top_k=args.top_k, prompts=args.prompts, n=args.n,
                            dp=args.dp, max_prompt=args.max_prompt, max_response=args.max_response,
                            max_token_len=args.max_token_len, response_median=args.response_median,
                            response_sigma=args.response_sigma, mini_batches=args.mini_batches, seed=args.seed,
                            kv_slots=args.kv_slots)
    except ValueError as exc:
        print(f"verl-r3 bench memory: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else memory.format_result(result))
    return 0


def _bench_e2e(args: argparse.Namespace) -> int:
    from verl_r3.bench import e2e

    try:
        result = e2e.run(runs=args.runs, steps=args.steps, skip=args.skip, prompts=args.prompts, samples=args.samples,
                         engine=args.engine, seed=args.seed, out=args.out, timeout_s=args.timeout,
                         warm_start_steps=args.warm_start_steps)
    except (ValueError, RuntimeError) as exc:
        print(f"verl-r3 bench e2e: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else e2e.format_result(result))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from verl_r3 import doctor

    report = doctor.collect()
    print(json.dumps(report, indent=2) if args.json else doctor.format_report(report))
    return 0


def _stress(args: argparse.Namespace) -> int:
    from verl_r3 import stress

    try:
        result = stress.run(args.engine, args.requests, model=args.model, seed=args.seed, timeout_s=args.timeout)
    except (ValueError, RuntimeError) as exc:
        print(f"verl-r3 stress: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else stress.format_result(result))
    if result["ok"]:
        return 0
    first, more = result["failures"][0], len(result["failures"]) - 1
    print(f"verl-r3 stress: FAIL: {first}" + (f" (and {more} more)" if more else ""), file=sys.stderr)
    return 1


def format_replay(result: dict) -> str:
    """The readable table of a ``verl_r3.bench.replay.run`` result."""
    s, m = result["shape"], result["machine"]

    def row(name: str, key: str) -> str:
        runs = ", ".join(f"{t:.3f}" for t in result[f"{key}_s"])
        return f"  {name:<22}{result[f'{key}_median']:9.3f} s   runs: {runs}"

    verdict = "within" if result["ratio"] <= result["target"] else "ABOVE"
    lines = [
        "verl-r3 bench replay: forward + backward, native routing vs rr.replay(own routing)",
        f"shape    {s['layers']} layers x {s['experts']} experts, top-{s['top_k']}, hidden {s['hidden']}, "
        f"moe_intermediate {s['moe_intermediate']}, {s['tokens']} tokens ({s['batch']} x {s['seq']}"
        f"{', packed' if s.get('remove_padding') else ''}), "
        f"{s['dtype']}, experts={s['experts_implementation']}, attention={s['attn_implementation']}",
        f"machine  {m['processor']} ({m['machine']}), {m['cpu_count']} CPUs, {m['threads']} torch threads, "
        f"torch {m['torch']}, transformers {m['transformers']}"
        + (f"; device {m['device']} ({m['device_name']})" if m.get("device_name") else ""),
        f"rounds   {result['repeats']} timed (+{result['warmup']} warmup), interleaved; median seconds:",
    ]
    if result.get("unbound_s"):
        lines.append(row("unbound (no hooks)", "unbound"))
    lines += [
        row("native (bound, idle)", "native"),
        row("replay (own routing)", "replay"),
        f"ratio    {result['ratio']:.4f} replay / native  (target <= {result['target']}: {verdict})",
        f"losses_equal {result['losses_equal']}  (replayed {result['replayed']} token-layer pairs, "
        f"disagree {result['disagree']}, fallback {result['fallback']})",
    ]
    if not result["losses_equal"]:
        lines.append(f"losses   replay - native at most {result['max_loss_diff']:.3g}; the native rounds "
                     f"{'agree' if result['native_losses_equal'] else 'differ'} with each other")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
