"""The CPU quickstart: verl's own trainer on a tiny MoE, GRPO and GSPO with and without R3.

``make quickstart`` runs ``scripts/quickstart.sh``, which sets the knobs and calls this
module. Steps:

1. build a tiny Qwen3-MoE and its tokenizer locally and warm-start it on generated
   arithmetic word problems (``verl_r3.quickstart.model``, ``.data``);
2. run ``python -m verl.trainer.main_ppo`` once per variant on the same seeds
   (``verl_r3.quickstart.runner``), each logging to W&B (offline unless logged in) and to
   ``<variant>.jsonl``;
3. write ``summary.json``, ``report.md`` and ``curves.png`` (``verl-r3 report`` over the run
   directory, ``verl_r3.quickstart.report``) into ``runs/quickstart/<timestamp>/``, which
   ``runs/quickstart/latest`` points at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from verl_r3.quickstart import data, model, report, reward
from verl_r3.quickstart.runner import DEFAULT_VARIANTS, ENGINES, VARIANTS, RunSpec, run_variant


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m verl_r3.quickstart", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/quickstart", help="parent of the timestamped run directory")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated, from " + ",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=12, help="training steps per variant")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="responses per prompt (GRPO group size)")
    p.add_argument("--engine", default="vllm", choices=ENGINES, help="rollout engine (actor_rollout_ref.rollout.name)")
    p.add_argument("--rollout-dtype", default="bfloat16", help="rollout precision (the trainer runs fp32)")
    p.add_argument("--hidden", type=int, default=64, help="model hidden size")
    p.add_argument("--layers", type=int, default=4, help="model layers (all MoE)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--warm-start-steps", type=int, default=None, help="supervised warm-start steps")
    p.add_argument("--lr", type=float, default=2e-4, help="actor learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed per variant")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    run_dir = os.path.abspath(os.path.join(args.out, time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(run_dir, exist_ok=True)
    latest = os.path.join(os.path.abspath(args.out), "latest")
    if os.path.islink(latest) or os.path.exists(latest):
        os.remove(latest)
    os.symlink(os.path.basename(run_dir), latest)
    print(f"quickstart: {run_dir}", flush=True)

    start = time.time()
    model_dir = os.path.join(run_dir, "model")
    kw = {} if args.warm_start_steps is None else {"warm_start_steps": args.warm_start_steps}
    info = model.build_model_dir(model_dir, hidden_size=args.hidden, layers=args.layers, experts=args.experts,
                                 top_k=args.top_k, seed=args.seed, **kw)
    print(f"model: {info}", flush=True)
    train_file, val_file = data.write_parquet(os.path.join(run_dir, "data"), train_size=max(256, args.prompts *
                                                                                          args.steps), test_size=64,
                                              seed=args.seed)
    spec = RunSpec(model=model_dir, train_file=train_file, val_file=val_file, reward_file=reward.__file__,
                   out_dir=run_dir, steps=args.steps, prompts=args.prompts, n=args.samples, lr=args.lr,
                   seed=args.seed, rollout_engine=args.engine, rollout_dtype=args.rollout_dtype,
                   group=os.path.basename(run_dir))
    for variant in variants:
        t0 = time.time()
        print(f"== {variant}: main_ppo, {args.steps} steps ...", flush=True)
        result = run_variant(variant, spec, timeout_s=args.timeout)
        with open(os.path.join(run_dir, f"{variant}.meta.json"), "w") as f:
            json.dump({"variant": variant, "group": spec.group, "project": spec.project,
                       "steps": len(result["metrics"]), "wall_s": result["seconds"]}, f)
        print(f"   done in {time.time() - t0:.0f}s (log {result['log']})", flush=True)
    summary = report.summarize(run_dir)
    print(open(os.path.join(run_dir, "report.md")).read())
    print(f"quickstart: {len(summary)} variants in {time.time() - start:.0f}s; report in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
