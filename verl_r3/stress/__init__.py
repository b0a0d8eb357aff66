"""``verl-r3 stress``: concurrent requests with routing capture and aborts, checked row by row.

``verl-r3 stress --engine hf|vllm|sglang [--requests N] [--json]`` starts one engine with
routing capture on a tiny fp32 Qwen3-MoE it builds (4 layers, 8 experts, top-2, hidden 128;
``--model DIR`` serves another), sends N requests at once (``workload``: prompts of 2 to 100
tokens, half of them on two shared prefixes, budgets of 1 to 40 tokens), aborts every 8th one
(requests 3, 11, 19, ...) after 2 to 4 streamed tokens with the engine's own per-request abort
(``serve``), and then sends one follow-up request. Every returned routing row, in every MoE
layer, is compared with a transformers fp32 forward of that one sequence alone (``check``).

Aborted cleanly
    A request the run aborted is *aborted cleanly* when

    1. the engine ended it with its aborted status (hf ``stop_reason="aborted"``, vLLM
       ``finish_reason="abort"``, SGLang ``finish_reason.type == "abort"``), after the abort was
       sent, not on its own;
    2. it returned at least the tokens it had streamed when the abort was sent, and no more than
       its budget;
    3. any routing it returned has exactly prompt + returned - 1 rows, and every (row, MoE layer)
       expert set equals the reference (an aborted request may return no routing at all).

    An abort that arrives after the request has ended on its own is not an abort: that request
    counts as completed (``aborts_missed``) and is checked as such.

The run passes (exit status 0) when no request failed, ``mismatched`` is 0 (every request that
returned routing, completed or aborted, matches in every row and MoE layer), every aborted
request was aborted cleanly, at least one abort took effect, and the follow-up request, sent
alone once the wave is over (the first aborted request's prompt and tokens, continued: it reads
what the aborted request left in the prefix cache), completes with matching routing: the engine
kept serving correctly through the aborts. Otherwise ``failures`` names each request and cause.

Result keys: ``engine``, ``requests``, ``completed``, ``aborted``, ``aborted_clean``,
``aborts_sent``, ``aborts_missed``, ``failed``, ``mismatched``, ``rows_compared`` (routing rows,
i.e. token positions), ``routers_compared`` (rows x MoE layers), ``aborted_with_routing``,
``tokens_after_abort`` (the most tokens any aborted request returned beyond those streamed when
its abort was sent), ``prefix_cached_requests`` (vLLM, SGLang), ``engine_stats`` (vLLM:
preemptions and prefix-cache hit tokens; SGLang: retractions; hf: batches), ``follow_up``,
``seconds`` (the whole command), ``wave_seconds`` (the concurrent wave), ``model``, ``machine``,
``failures``, ``ok``.

Every engine runs in a child process in its own process group (SGLang with its environment's
interpreter, ``scripts/sglang_env.sh``), killed whole when ``timeout_s`` is up or when it ends,
so a hung engine ends the command with an error naming it and the tail of its log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from verl_r3.child import run_child
from verl_r3.stress import workload

__all__ = ["ENGINES", "MODEL", "format_result", "run"]

ENGINES = ("hf", "vllm", "sglang")
MODEL = {"layers": 4, "experts": 8, "top_k": 2, "hidden": 128}  # the model built when --model is not given

# Each engine's settings: small enough that the wave meets the engine's harder paths
# (vLLM: preemption and recompute; hf: several batches, requests queued behind a batch).
ENGINE_ARGS = {
    "hf": {"max_batch": 32},
    "vllm": {"max_model_len": 160, "max_num_batched_tokens": 128, "max_num_seqs": 64, "num_blocks": 12},
    "sglang": {"max_total_tokens": 2048, "context_length": 160},
}


def _serve_in_child(spec: dict, python: str, work: Path, timeout_s: float) -> dict:
    """``serve.main`` under ``python`` in its own process group, killed whole after ``timeout_s``."""
    root = str(Path(__file__).resolve().parents[2])  # the checkout: SGLang's environment lacks verl_r3
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               VLLM_LOGGING_STREAM="ext://sys.stderr", TOKENIZERS_PARALLELISM="false")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if spec["engine"] != "vllm":  # vLLM's CPU build binds its own OpenMP threads
        # One OpenMP thread per process: the engine's processes share the cores with each other
        # and with whatever else runs, and two threads each stalled at their barriers. Measured on
        # a 2-core machine under load: SGLang's wave 8 to 45 s instead of 0.6 to 0.8 s; hf decode
        # steps of 1.7 s instead of 0.03 s (the eager experts' index_add_).
        env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("SGLANG_USE_CPU_ENGINE", None)  # SGLang's own CPU engine needs a CPU build of sgl-kernel
    spec_path, out_path, log_path = work / "spec.json", work / "served.json", work / f"{spec['engine']}.log"
    spec_path.write_text(json.dumps(spec))
    with open(log_path, "w") as log:  # the engine's own processes die with the child, hung or not
        code = run_child([python, "-m", "verl_r3.stress.serve", str(spec_path), str(out_path)], timeout_s=timeout_s,
                         stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    tail = log_path.read_text(errors="replace")[-3000:]
    if code is None:
        raise RuntimeError(f"the {spec['engine']} engine did not finish within {timeout_s:.0f} s; its process group "
                           f"was killed. Log tail:\n{tail}")
    if code != 0 or not out_path.exists():
        raise RuntimeError(f"the {spec['engine']} engine failed (exit {code}). Log tail:\n{tail}")
    return json.loads(out_path.read_text())


def _engine_python(engine: str) -> str:
    if engine != "sglang":
        return sys.executable
    from verl_r3.diagnose.rollout import sglang_interpreter

    return sglang_interpreter()


def run(engine: str, requests: int = 64, *, model: str | None = None, reference: str | None = None,
        seed: int = 0, timeout_s: float = 600.0) -> dict:
    """Stress ``engine`` and return the result dict (keys and rules in the module docstring).

    ``reference`` is the model directory the routing is recomputed with (default: the served
    model; another one makes every request mismatch, which is how the check itself is tested).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if timeout_s <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    if model is not None:  # a supported MoE directory with config and weights, checked before any engine starts
        from verl_r3.diagnose.inputs import inspect_model_dir

        inspect_model_dir(model)
    import torch

    from verl_r3.bench.capture import build_model, machine
    from verl_r3.stress.check import Reference, check_outcome

    began = time.perf_counter()
    reqs = workload.draw(requests, seed)
    with tempfile.TemporaryDirectory(prefix="verl_r3_stress_") as tmp:
        work = Path(tmp)
        if model is None:
            model_dir = str(work / "model")
            build_model(model_dir, seed=seed, **MODEL)
        else:
            model_dir = str(Path(model).resolve())
        spec = {"engine": engine, "model": model_dir, "seed": seed, "engine_args": ENGINE_ARGS[engine],
                "requests": [r.to_json() for r in reqs]}
        served = _serve_in_child(spec, _engine_python(engine), work, timeout_s)
        # One intra-op thread for the reference's small forwards, for the same reason as the
        # children's OMP_NUM_THREADS: with two, 64 of them once took 53 s instead of 0.6 s.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ref = Reference(reference or model_dir)
            verdicts = [check_outcome(r, o, ref) for r, o in zip(reqs, served["outcomes"])]
            follow = served["follow_up"]
            follow_req = workload.StressRequest(len(reqs), follow["prompt_ids"], workload.FOLLOW_UP_TOKENS)
            follow_verdict = check_outcome(follow_req, follow, ref, who=f"follow-up request {len(reqs)}")
        finally:
            torch.set_num_threads(threads)
    return _summary(engine, reqs, served, verdicts, follow_verdict, ref, time.perf_counter() - began,
                    model=model or dict(MODEL, seed=seed),
                    machine=machine(**served.get("versions", {})))


def _summary(engine, reqs, served, verdicts, follow_verdict, ref, seconds, *, model, machine) -> dict:
    outcomes = served["outcomes"]
    aborted = [(r, o, v) for r, o, v in zip(reqs, outcomes, verdicts) if o["status"] == "aborted"]
    sent = [o for o in outcomes if o["abort_sent"] is not None]
    failures = [msg for v in verdicts for msg in (v.problem, v.mismatch) if msg]
    if follow_verdict.status != "completed":
        failures.append(f"{follow_verdict.who}, sent after the aborts, ended {follow_verdict.status}, not completed")
    failures += [msg for msg in (follow_verdict.problem, follow_verdict.mismatch) if msg]
    aborted_n = len(aborted)
    if sent and not aborted_n:
        failures.append(f"no abort took effect: {len(sent)} sent, and every request ran to its end")
    cached = [o["cached_tokens"] for o in outcomes if o["cached_tokens"] is not None]
    return {
        "engine": engine,
        "requests": len(reqs),
        "completed": sum(o["status"] == "completed" for o in outcomes),
        "aborted": aborted_n,
        "aborted_clean": sum(v.ok for _, _, v in aborted),
        "aborts_sent": len(sent),
        "aborts_missed": sum(o["status"] == "completed" for o in sent),
        "failed": sum(o["status"] == "error" for o in outcomes),
        "mismatched": sum(v.mismatch is not None for v in verdicts),
        "rows_compared": sum(v.rows for v in verdicts),
        "routers_compared": sum(v.rows for v in verdicts) * len(ref.moe_layers),
        "aborted_with_routing": sum(o["routing"] is not None for _, o, _ in aborted),
        "tokens_after_abort": max((len(o["token_ids"]) - o["abort_sent"] for _, o, _ in aborted
                                   if o["abort_sent"] is not None), default=0),
        "prefix_cached_requests": sum(c > 0 for c in cached) if cached else None,
        "engine_stats": served.get("stats", {}),
        "follow_up": {"status": follow_verdict.status, "prompt_tokens": len(served["follow_up"]["prompt_ids"]),
                      "tokens": len(served["follow_up"]["token_ids"]), "rows_compared": follow_verdict.rows,
                      "ok": follow_verdict.ok and follow_verdict.status == "completed"},
        "seconds": round(seconds, 2),
        "wave_seconds": round(served["seconds"], 2),
        "model": model,
        "machine": machine,
        "failures": failures,
        "ok": not failures,
    }


def format_result(result: dict) -> str:
    """The readable table of a ``run`` result."""
    m = result["model"]
    model = m if isinstance(m, str) else (f"{m['layers']} layers x {m['experts']} experts, top-{m['top_k']}, "
                                          f"hidden {m['hidden']}, float32 (built, seed {m['seed']})")
    stats = ", ".join(f"{k} {v}" for k, v in result["engine_stats"].items())
    if result["prefix_cached_requests"] is not None:
        stats += f", prefix-cached requests {result['prefix_cached_requests']}"
    f = result["follow_up"]
    lines = [
        f"verl-r3 stress --engine {result['engine']}: {result['requests']} concurrent requests with routing capture, "
        "aborts, then a follow-up",
        f"model     {model}",
        "machine   " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
        f"requests  {result['requests']}: completed {result['completed']}, aborted {result['aborted']} "
        f"(clean {result['aborted_clean']}), failed {result['failed']}; aborts sent {result['aborts_sent']}, "
        f"missed {result['aborts_missed']}",
        f"routing   mismatched {result['mismatched']}; {result['rows_compared']} rows, "
        f"{result['routers_compared']} (row, MoE layer) expert sets compared with single-request fp32 forwards",
        f"aborts    {result['aborted_with_routing']} of {result['aborted']} returned routing; tokens returned "
        f"past the abort: at most {result['tokens_after_abort']}",
        f"engine    {stats}",
        f"follow-up {f['status']}, {f['prompt_tokens']}-token prompt, {f['tokens']} tokens, "
        f"{'routing matches' if f['ok'] else 'FAILED'}",
        f"seconds   {result['seconds']} in all, wave {result['wave_seconds']}",
        f"result    {'PASS' if result['ok'] else 'FAIL'}",
    ]
    lines += [f"  {msg}" for msg in result["failures"][:20]]
    if len(result["failures"]) > 20:
        lines.append(f"  ... and {len(result['failures']) - 20} more")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run `verl-r3 stress --engine ENGINE`")
