"""Seconds per training step of the CPU quickstart: GRPO + R3 against GRPO, same seeds.

Both sides are verl's ``main_ppo`` on the quickstart's tiny MoE and data (``verl_r3.quickstart``),
with the same model, data, seeds and engine; the only difference is the variant (``grpo_r3``
captures routing in the rollout and replays it in the trainer, ``grpo`` does neither). Runs
alternate ``grpo, grpo_r3, grpo, grpo_r3, ...`` so drifts of the machine reach both sides.

A step's time is verl's own ``timing_s/step``; the first ``skip`` steps of each run (process
warm-up, first compilation and allocation) are left out. Per side the median over all kept steps
of all its runs is reported, with verl's phase timings (generation, old log-probs, actor update)
beside it, and ``ratio`` = R3 median / GRPO median against ``TARGET_RATIO``.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time

__all__ = ["PHASES", "SIDES", "TARGET_RATIO", "run"]

TARGET_RATIO = 1.03
SIDES = ("grpo", "grpo_r3")
PHASES = ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob", "timing_s/update_actor")


def _machine() -> dict:
    import torch

    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "system": platform.system(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def run(*, runs: int = 2, steps: int = 8, skip: int = 2, prompts: int = 8, samples: int = 4, engine: str = "vllm",
        seed: int = 0, out: str | None = None, timeout_s: float = 900, warm_start_steps: int | None = None) -> dict:
    """Run ``runs`` quickstart trainings per side, alternating; see the module docstring.

    ``warm_start_steps``: the model's supervised warm start (default: the quickstart model's own);
    fewer steps build the model sooner, and the step timings stay comparable between the sides."""
    from verl_r3.quickstart import data, model, reward
    from verl_r3.quickstart.runner import ENGINES, RunSpec, run_variant

    if runs < 1 or prompts < 1 or samples < 2:
        raise ValueError(f"need runs >= 1, prompts >= 1 and samples >= 2 (GRPO groups), got {runs}, {prompts}, {samples}")
    if skip < 0 or steps <= skip:
        raise ValueError(f"steps ({steps}) must exceed the skipped warm-up steps ({skip})")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    root = os.path.abspath(out) if out else tempfile.mkdtemp(prefix="verl_r3_bench_e2e_")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {out!r}: cannot create the output directory ({exc.strerror})") from None
    model_dir = os.path.join(root, "model")
    built = model.build_model_dir(model_dir, seed=seed, log=None,
                                  **({} if warm_start_steps is None else {"warm_start_steps": warm_start_steps}))
    train_file, val_file = data.write_parquet(os.path.join(root, "data"), train_size=max(256, prompts * steps),
                                              test_size=16, seed=seed)
    per_side: dict[str, dict[str, list[float]]] = {side: {phase: [] for phase in PHASES} for side in SIDES}
    wall: dict[str, list[float]] = {side: [] for side in SIDES}
    started = time.time()
    for i in range(runs):
        for side in SIDES:
            spec = RunSpec(model=model_dir, train_file=train_file, val_file=val_file, reward_file=reward.__file__,
                           out_dir=os.path.join(root, f"run{i}"), steps=steps, prompts=prompts, n=samples,
                           seed=seed, rollout_engine=engine, group=f"bench-e2e-{i}")
            result = run_variant(side, spec, timeout_s=timeout_s)
            wall[side].append(result["seconds"])
            for record in result["metrics"][skip:steps]:
                for phase in PHASES:
                    value = record["data"].get(phase)
                    if value is None:
                        raise RuntimeError(f"{side} run {i} step {record.get('step')}: verl logged no {phase}")
                    per_side[side][phase].append(float(value))
    medians = {side: {phase: statistics.median(values) for phase, values in phases.items()}
               for side, phases in per_side.items()}
    ratio = medians["grpo_r3"]["timing_s/step"] / medians["grpo"]["timing_s/step"]
    return {
        "benchmark": "e2e",
        "machine": _machine(),
        "config": {"runs": runs, "steps": steps, "skip": skip, "prompts": prompts, "samples": samples,
                   "engine": engine, "seed": seed, "warm_start_steps": built["warm_start_steps"], "out": root},
        "step_s": {side: per_side[side]["timing_s/step"] for side in SIDES},
        "medians": medians,
        "phase_ratios": {phase: medians["grpo_r3"][phase] / medians["grpo"][phase] for phase in PHASES},
        "run_wall_s": wall,
        "ratio": ratio,
        "target": TARGET_RATIO,
        "within_target": ratio <= TARGET_RATIO,
        "seconds": time.time() - started,
    }


def format_result(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [
        "verl-r3 bench e2e: seconds per quickstart step (verl's timing_s/step), GRPO + R3 vs GRPO",
        f"config   {c['runs']} runs per side, alternating; {c['steps']} steps each, first {c['skip']} left out; "
        f"{c['prompts']} prompts x {c['samples']} samples; engine {c['engine']}; seed {c['seed']}; "
        f"model warm start {c['warm_start_steps']} steps",
        f"machine  {m['processor']} ({m['machine']}), {m['cpu_count']} CPUs, torch {m['torch']}",
        f"  {'median s':<24}{'grpo':>9}{'grpo_r3':>9}{'ratio':>8}",
    ]
    for phase in PHASES:
        lines.append(f"  {phase:<24}{result['medians']['grpo'][phase]:9.3f}{result['medians']['grpo_r3'][phase]:9.3f}"
                     f"{result['phase_ratios'][phase]:8.3f}")
    for side in SIDES:
        lines.append(f"  steps {side:<8} " + ", ".join(f"{s:.2f}" for s in result["step_s"][side]))
    verdict = "within" if result["within_target"] else "ABOVE"
    lines.append(f"ratio    {result['ratio']:.4f} grpo_r3 / grpo  (target <= {result['target']}: {verdict})")
    return "\n".join(lines)
