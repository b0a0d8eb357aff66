"""``verl-r3 diagnose``: the training-inference mismatch of a MoE model, with and without R3.

Given a model directory (a Hugging Face MoE of a family ``verl_r3.families`` supports), prompts
and a rollout engine, it runs one RL step up to the loss and measures the mismatch:

1. Rollout: the engine (``hf``, ``vllm`` or ``sglang``) samples ``--samples`` responses per
   prompt in ``--rollout-dtype`` (bf16 by default, as in RL) and returns the log-prob of each
   sampled token (``log_softmax(logits / T)``, verl's convention) and the routing of every
   token (contract: ``verl_r3.core.record``, ``[n - 1, L, K]``).
2. Trainer: transformers in ``--train-dtype`` (fp32 by default) recomputes the response
   log-probs three times: native routing, R3 (``RouterReplay.replay`` of the rollout's routing)
   and native again (is the trainer consistent with itself?). One backward under replay checks
   that the routers still get gradients.
3. ``OUT/metrics.json``: ``no_replay`` (rollout vs trainer, native routing), ``replay`` (rollout
   vs trainer under R3) and ``forward_twice`` (trainer vs itself), each with k3 KL, F(tau) and
   router disagreement from ``verl_r3.core.metrics``, plus ``setup``; and four PNGs with the
   paper's views (``FIGURES``).

``--demo`` builds the quickstart's tiny Qwen3-MoE (``verl_r3.quickstart.model``, warm-started on
generated arithmetic) and diagnoses it on a CPU in about two minutes.

vLLM and SGLang run in a child process (``rollout.engine_worker``): both start engine processes
of their own, vLLM logs to stdout, and SGLang lives in its own environment
(``scripts/sglang_env.sh``). The child writes the samples to files that this process reads.

Modules: ``inputs`` (model directory, tokenizer, prompts), ``rollout`` (the engines), ``plots``
(the figures); this one recomputes, measures, and runs the command.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path

from verl_r3.argtypes import positive_int
from verl_r3.diagnose.inputs import (
    ModelInfo,
    eos_ids,
    generated_prompts,
    inspect_model_dir,
    load_prompts,
    load_tokenizer,
    prompts_file,
)
from verl_r3.diagnose.plots import COMPARISONS, FIGURES, plot_figures
from verl_r3.diagnose.rollout import (
    Sample,
    engine_worker,
    generate_hf,
    generate_in_child,
    progress_bar,
    sglang_interpreter,
    to_routing,
)

__all__ = ["DEMO", "ENGINES", "FIGURES", "add_arguments", "engine_worker", "load_prompts", "main", "report", "run"]

ENGINES = ("auto", "hf", "vllm", "sglang")
DTYPES = ("bfloat16", "float16", "float32")

# The demo model is the quickstart's with 32 experts instead of 8: near-ties between experts are
# what bf16 flips, and with 8 a routing flip that moves a token's probability by 2x turned up
# about once in 3000 response tokens, too rarely for F(2) to show. Answers are a few tokens, so
# the demo samples 4096 responses (about 13k tokens).
DEMO = dict(hidden_size=64, layers=4, experts=32, top_k=2, warm_start_steps=800, prompts=1024, samples=4,
            max_new_tokens=8)
DEFAULTS = dict(prompts=64, samples=4, max_new_tokens=64)  # without --demo; a prompts file gives all its rows
DEFAULT_OUT = {False: "runs/diagnose", True: "runs/diagnose-demo"}


# -- trainer ------------------------------------------------------------------------------------------------
def load_trainer(path: str, dtype: str, device: str):
    import torch
    import transformers

    kwargs = {"dtype": getattr(torch, dtype), "attn_implementation": "eager"}
    if device == "cpu":
        kwargs["experts_implementation"] = "eager"  # grouped_mm is several times slower on a CPU
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (TypeError, ValueError):
        kwargs.pop("experts_implementation", None)  # families without a choice of experts kernel
        model = transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device).eval()


def _batch(samples: list[Sample], routing: list, pad: int, device: str):
    """Right-padded inputs (every token but the last, whose logits predict nothing), the replay routing
    of those positions, and each sample's input length. Padding rows take the sample's first routing
    row, so they are replayed rather than counted as fallback (they affect no real token)."""
    import torch

    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    ids = torch.full((len(samples), max(lengths)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    routed = torch.empty((*ids.shape, *routing[0].shape[1:]), dtype=routing[0].dtype)
    for b, (s, r, n) in enumerate(zip(samples, routing, lengths)):
        ids[b, :n] = torch.tensor((s.prompt_ids + s.response_ids)[:n])
        mask[b, :n] = 1
        routed[b, :n], routed[b, n:] = r[:n], r[0]
    return ids.to(device), mask.to(device), routed.to(device), lengths


def _response_log_probs(logits, s: Sample, n: int, temperature: float):
    """log_softmax(logits / T) of the response tokens; logits at position t predict token t + 1."""
    import torch

    target = torch.tensor(s.response_ids, device=logits.device).unsqueeze(-1)
    return torch.log_softmax(logits[len(s.prompt_ids) - 1:n].float() / temperature, dim=-1).gather(-1, target)[:, 0]


def recompute(model, rr, samples: list[Sample], routing: list, *, mode: str, temperature: float, batch_size: int,
              pad: int, device: str) -> dict:
    """One trainer pass (``mode``: native, replay or again) over every sample: per sample the response
    log-probs and the experts that produced them (native top-k, or under replay the experts actually
    used); for replay also the fallback and replayed (token, layer) counts of ``rr.stats``."""
    import torch

    out = {"log_probs": [], "routing": [], "fallback": 0, "replayed": 0}
    title = {"native": "trainer, native routing", "replay": "trainer, R3 replay", "again": "trainer, native again"}
    with progress_bar(len(samples), title[mode]) as bar, torch.no_grad():
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            ids, mask, routed, lengths = _batch(chunk, routing[start:start + batch_size], pad, device)
            if mode == "replay":
                with rr.replay(routed) as handle:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                used = handle.used_experts
                out["fallback"] += rr.stats["fallback"]
                out["replayed"] += rr.stats["replayed"]
            else:
                with rr.record() as handle:
                    logits = model(input_ids=ids, attention_mask=mask).logits
                used = handle.routed_experts
            for b, (s, n) in enumerate(zip(chunk, lengths)):
                out["log_probs"].append(_response_log_probs(logits[b], s, n, temperature).cpu())
                out["routing"].append(used[b, len(s.prompt_ids) - 1:n].cpu())
            bar.update(len(chunk))
    return out


def router_gradients(model, rr, samples: list[Sample], routing: list, *, temperature: float, pad: int,
                     device: str) -> list[float]:
    """|grad| summed over each MoE router's weight after one backward of the response log-likelihood
    under replay: R3 must leave the routers trainable."""
    import torch

    ids, mask, routed, lengths = _batch(samples, routing, pad, device)
    model.zero_grad(set_to_none=True)
    with rr.replay(routed):
        logits = model(input_ids=ids, attention_mask=mask).logits
        log_probs = [_response_log_probs(logits[b], s, n, temperature)
                     for b, (s, n) in enumerate(zip(samples, lengths))]
        (-torch.cat(log_probs).mean()).backward()
    grads = [getattr(layer.router, "weight", None) for layer in rr.layers]
    grads = [float(w.grad.abs().sum()) if w is not None and w.grad is not None else 0.0 for w in grads]
    model.zero_grad(set_to_none=True)
    return grads


# -- metrics and figures ------------------------------------------------------------------------------------
def comparison(reference_lp, other_lp, reference_routing, other_routing, num_layers: int, moe_layers) -> dict:
    """k3 KL, F(tau) and router disagreement of ``other`` against ``reference`` over all response tokens."""
    import torch

    from verl_r3.core.metrics import logprob_mismatch, router_disagreement

    out = logprob_mismatch(reference_lp, other_lp, torch.ones_like(reference_lp, dtype=torch.bool))
    d = router_disagreement(reference_routing, other_routing)
    out.update(router_disagree=d["router"], router_disagree_token=d["token"],
               router_disagree_layers_per_token=d["layers_per_token"], router_pairs=d["pairs"],
               router_disagree_per_layer=[d["per_layer"][i] if i in moe_layers else None for i in range(num_layers)])
    return out


def differing_layers(routing_a, routing_b):
    """Per token, the number of MoE layers whose expert sets differ (rows with routing on both sides)."""
    from verl_r3.core.metrics import expert_sets_differ

    counted = ~(routing_a == -1).all(-1) & ~(routing_b == -1).all(-1)
    return (expert_sets_differ(routing_a, routing_b) & counted).sum(-1)


def measure(rolled: list[Sample], routing: list, passes: dict, info: ModelInfo, moe: list[int]) -> tuple[dict, dict]:
    """The three comparisons, the F(tau) curves and the differing-layers histogram (``metrics.json``
    without ``setup``), and the per-token series the probability scatter draws."""
    import numpy as np
    import torch

    from verl_r3.core.metrics import extreme_frac_curve

    rollout_lp = torch.tensor([x for s in rolled for x in s.log_probs], dtype=torch.float32)
    rollout_routing = torch.cat([r[len(s.prompt_ids) - 1:-1] for s, r in zip(rolled, routing)])
    lp = {k: torch.cat(v["log_probs"]) for k, v in passes.items()}
    used = {k: torch.cat(v["routing"]) for k, v in passes.items()}
    pairs = {"no_replay": (rollout_lp, lp["native"], rollout_routing, used["native"]),
             "replay": (rollout_lp, lp["replay"], rollout_routing, used["replay"]),
             "forward_twice": (lp["native"], lp["again"], used["native"], used["again"])}
    metrics = {key: comparison(*pair, info.num_layers, moe) for key, pair in pairs.items()}
    metrics["replay"].update(fallback=passes["replay"]["fallback"], replayed=passes["replay"]["replayed"])
    taus = np.logspace(math.log10(1.01), 2, 120)
    mask = torch.ones_like(rollout_lp, dtype=torch.bool)
    metrics["extreme_frac_curve"] = {"tau": taus.tolist()} | {
        key: extreme_frac_curve(a, b, mask, torch.from_numpy(taus)).tolist() for key, (a, b, _, _) in pairs.items()}
    flips = differing_layers(rollout_routing, used["native"])
    metrics["differing_layers_hist"] = torch.bincount(flips, minlength=len(moe) + 1).tolist()
    series = {"rollout": rollout_lp.double().numpy(), "no_replay": lp["native"].double().numpy(),
              "replay": lp["replay"].double().numpy(), "flipped": (flips > 0).numpy()}
    return metrics, series


def format_table(metrics: dict) -> str:
    rows = [("", "k3 KL", "F(1.5)", "F(2)", "F(5)", "router disagree")]
    for key, label in COMPARISONS:
        m = metrics[key]
        rows.append((f"{key:<14}{label}", *(f"{m[k]:.3e}" for k in ("k3_kl", "extreme_frac_1.5", "extreme_frac_2",
                                                                      "extreme_frac_5", "router_disagree"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


# -- the run ------------------------------------------------------------------------------------------------
def _demo_model(out: Path, seed: int, warm_start_steps: int) -> tuple[str, dict]:
    """The demo model in ``out/model``: built (warm start with a progress bar), or reused when an
    earlier run there built it with the same settings and seed."""
    from verl_r3.quickstart.model import build_model_dir

    folder, stamp = out / "model", out / "model" / "diagnose_demo.json"
    wanted = {k: DEMO[k] for k in ("hidden_size", "layers", "experts", "top_k")}
    wanted |= {"warm_start_steps": warm_start_steps, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == wanted:
        print(f"reusing the demo model in {folder}", file=sys.stderr)
        return str(folder), json.loads(stamp.read_text())["warm_start"]
    with progress_bar(warm_start_steps, "warm start (demo model)", unit="step") as bar:
        def log(msg: str) -> None:  # build_model_dir reports every tenth of the steps
            step = re.match(r"warm start step (\d+)/\d+: answer loss ([\d.]+)", msg)
            if step:
                bar.update(int(step[1]) - bar.n)
                bar.set_postfix(loss=step[2])
            else:
                bar.write(msg, file=sys.stderr)

        figures = build_model_dir(folder, seed=seed, log=log, **{k: v for k, v in wanted.items() if k != "seed"})
    stamp.write_text(json.dumps({"settings": wanted, "warm_start": figures}, indent=2) + "\n")
    return str(folder), figures


def _check_options(model_dir, demo: bool, engine: str, rollout_dtype: str, train_dtype: str, counts: dict,
                   temperature: float, warm_start_steps: int | None, timeout: float) -> None:
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    for name, value in (("rollout_dtype", rollout_dtype), ("train_dtype", train_dtype)):
        if value not in DTYPES:
            raise ValueError(f"{name} {value!r} is not one of {', '.join(DTYPES)}")
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (log-probs are log_softmax(logits / T)), got {temperature}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    if warm_start_steps is not None and (not demo or warm_start_steps < 0):
        raise ValueError(f"warm_start_steps applies to the demo model only and must be >= 0, got {warm_start_steps}")
    if demo and model_dir is not None:
        raise ValueError("--demo builds its own model; give either --demo or --model")
    if not demo and model_dir is None:
        raise ValueError("no model: give --model DIR (a Hugging Face MoE directory) or --demo")


def run(model_dir: str | None = None, *, out: str | Path | None = None, demo: bool = False, prompts: str | None = None,
        num_prompts: int | None = None, engine: str = "hf", rollout_dtype: str = "bfloat16",
        train_dtype: str = "float32", samples: int | None = None, max_new_tokens: int | None = None,
        temperature: float = 1.0, seed: int = 0, batch_size: int = 64, timeout: float = 3600.0,
        warm_start_steps: int | None = None) -> dict:
    """Diagnose ``model_dir`` (or the demo model); write ``out/metrics.json`` and the figures.

    Returns what ``metrics.json`` holds, plus ``files`` (the paths written). User errors raise
    ValueError; an engine that fails or times out raises RuntimeError."""
    began = time.perf_counter()
    defaults = DEMO if demo else DEFAULTS
    _check_options(model_dir, demo, engine, rollout_dtype, train_dtype, dict(
        num_prompts=num_prompts, samples=samples, max_new_tokens=max_new_tokens, batch_size=batch_size),
        temperature, warm_start_steps, timeout)
    samples = samples or defaults["samples"]
    max_new_tokens = max_new_tokens or defaults["max_new_tokens"]
    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") is not None else "hf"
    python = sglang_interpreter() if engine == "sglang" else sys.executable  # before any work: fail fast
    if prompts is not None:
        prompts_file(prompts)
    info = None if demo else inspect_model_dir(model_dir)  # a user's inputs are checked before anything is written
    out = Path(out or DEFAULT_OUT[demo])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {str(out)!r}: cannot create the output directory ({exc.strerror})") from None
    seconds, warm = {}, None
    if demo:
        t = time.perf_counter()
        model_dir, warm = _demo_model(out, seed, DEMO["warm_start_steps"] if warm_start_steps is None
                                      else warm_start_steps)
        seconds["build"] = round(time.perf_counter() - t, 1)
        info = inspect_model_dir(model_dir)
    tokenizer = load_tokenizer(info.path)
    prompt_ids = load_prompts(prompts, tokenizer, num_prompts) if prompts is not None else \
        generated_prompts(tokenizer, num_prompts or defaults["prompts"], seed)
    for i, p in enumerate(prompt_ids):
        if info.max_positions and len(p) + max_new_tokens > info.max_positions:
            raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"max_position_embeddings {info.max_positions}")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    eos = eos_ids(info.path, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    spec = {"engine": engine, "model": info.path, "dtype": rollout_dtype, "prompts": prompt_ids, "samples": samples,
            "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "batch_size": batch_size,
            "eos": eos, "pad": pad, "num_layers": info.num_layers, "top_k": info.top_k, "device": device}
    t = time.perf_counter()
    rolled = generate_hf(spec) if engine == "hf" else generate_in_child(spec, python, out, timeout)
    seconds["rollout"] = round(time.perf_counter() - t, 1)

    from verl_r3 import RouterReplay

    t = time.perf_counter()
    model = load_trainer(info.path, train_dtype, device)
    rr = RouterReplay(model)
    moe = sorted(rr.moe_layers)
    routing = to_routing(rolled, info, moe)
    kw = dict(temperature=temperature, batch_size=batch_size, pad=pad, device=device)
    passes = {mode: recompute(model, rr, rolled, routing, mode=mode, **kw) for mode in ("native", "replay", "again")}
    grads = router_gradients(model, rr, rolled[:8], routing[:8], temperature=temperature, pad=pad, device=device)
    rr.remove()
    seconds["recompute"] = round(time.perf_counter() - t, 1)

    import transformers

    metrics, series = measure(rolled, routing, passes, info, moe)
    metrics |= {"router_grad_abs_sum": grads, "router_grads_nonzero": all(g > 0 for g in grads)}
    metrics["setup"] = {
        "model_dir": info.path, "family": info.model_type, "layers": info.num_layers, "moe_layers": moe,
        "experts": info.num_experts, "top_k": info.top_k, "engine": engine, "rollout_dtype": rollout_dtype,
        "train_dtype": train_dtype, "device": device, "prompts": len(prompt_ids),
        "prompts_file": None if prompts is None else str(prompts), "samples": samples, "sequences": len(rolled),
        "tokens": len(series["rollout"]), "max_new_tokens": max_new_tokens, "temperature": temperature,
        "seed": seed, "demo": demo, "warm_start": warm, "torch": torch.__version__,
        "transformers": transformers.__version__, "step_seconds": seconds,
    }
    title = (f"{info.model_type} ({info.path}): {engine} rollout in {rollout_dtype}, trainer in {train_dtype}, "
             f"{len(series['rollout'])} response tokens")
    files = plot_figures(out, series, metrics, title)
    metrics["setup"]["seconds"] = round(time.perf_counter() - began, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics | {"files": [str(out / "metrics.json")] + [str(p) for p in files]}


# -- command line -------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``verl-r3 diagnose`` (``main`` reads them)."""
    add = parser.add_argument
    add("--model", metavar="DIR", help="Hugging Face MoE model directory (config, weights, tokenizer)")
    add("--demo", action="store_true", help="build the quickstart's tiny Qwen3-MoE, warm-started on arithmetic, "
        "and diagnose it")
    add("--prompts", metavar="FILE", help="verl parquet (column 'prompt': chat messages) or jsonl (field 'prompt': "
        "a string or chat messages); default: generated arithmetic word problems")
    add("--num-prompts", type=positive_int, metavar="N", help="prompts to use (default: every one in --prompts, else "
        f"{DEFAULTS['prompts']}; demo {DEMO['prompts']})")
    add("--engine", choices=ENGINES, default="hf", help="rollout engine (default hf; auto: vllm when installed, "
        "else hf)")
    add("--rollout-dtype", choices=DTYPES, default="bfloat16", help="dtype of the rollout (default bfloat16)")
    add("--train-dtype", choices=DTYPES, default="float32", help="dtype of the trainer (default float32)")
    add("--samples", type=positive_int, metavar="N", help=f"responses per prompt (default {DEFAULTS['samples']})")
    add("--max-new-tokens", type=positive_int, metavar="N", help="response length limit (default "
        f"{DEFAULTS['max_new_tokens']}; demo {DEMO['max_new_tokens']})")
    add("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default 1.0)")
    add("--seed", type=int, default=0, metavar="N", help="random seed (default 0)")
    add("--batch-size", type=positive_int, default=64, metavar="N", help="sequences per forward (default 64)")
    add("--timeout", type=float, default=3600.0, metavar="S",
        help="seconds a vllm or sglang rollout may take (default 3600)")
    add("--warm-start-steps", type=int, metavar="N", help="demo only: warm-start steps of the demo model (default "
        f"{DEMO['warm_start_steps']})")
    add("--out", metavar="DIR", help=f"output directory (default {DEFAULT_OUT[False]}; demo {DEFAULT_OUT[True]})")


def report(metrics: dict) -> str:
    """The printed summary: setup, the three rows, replay counts, router gradients, files written."""
    s, r = metrics["setup"], metrics["replay"]
    lines = [
        f"{s['family']} {s['model_dir']}: {s['engine']} rollout in {s['rollout_dtype']}, trainer in "
        f"{s['train_dtype']}; {s['prompts']} prompts x {s['samples']} samples, {s['tokens']} response tokens",
        "",
        format_table(metrics),
        "",
        f"R3 replayed {r['replayed']} (token, layer) pairs, {r['fallback']} fell back to native routing; without R3 "
        f"{metrics['no_replay']['router_disagree_token']:.2%} of response tokens differ in at least one MoE layer",
        "router |grad| per MoE layer after one backward under replay: "
        + ", ".join(f"{g:.3g}" for g in metrics["router_grad_abs_sum"]),
        f"done in {s['seconds']:.0f} s; wrote:",
    ]
    return "\n".join(lines + [f"  {p}" for p in metrics["files"]])


def main(args: argparse.Namespace) -> int:
    """Run with the options of ``add_arguments``; print the report. Exit status 2 for a user error,
    1 for an engine failure."""
    try:
        metrics = run(args.model, out=args.out, demo=args.demo, prompts=args.prompts, num_prompts=args.num_prompts,
                      engine=args.engine, rollout_dtype=args.rollout_dtype, train_dtype=args.train_dtype,
                      samples=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      seed=args.seed, batch_size=args.batch_size, timeout=args.timeout,
                      warm_start_steps=args.warm_start_steps)
    except ValueError as exc:
        print(f"verl-r3 diagnose: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"verl-r3 diagnose: {exc}", file=sys.stderr)
        return 1
    print(report(metrics))
    return 0
