"""Run verl's own trainer (``python -m verl.trainer.main_ppo``) on CPU for one quickstart variant.

Everything here is configuration: verl's algorithms and keys, plus verl_r3's two settings
(``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate`` and the FSDP engine's
``router_replay.mode``). ``cpu_overrides`` is what any verl run needs on a CPU-only machine
with verl_r3; ``VARIANTS`` holds the per-algorithm deltas.

Every run is a subprocess under a wall-clock limit (a failed Ray worker can leave verl
waiting forever); on timeout the whole process group is killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from verl_r3 import wandb_naming
from verl_r3.child import run_child
from verl_r3.integration import cpu_settings

__all__ = ["DEFAULT_VARIANTS", "VARIANTS", "RunSpec", "cpu_overrides", "merge_overrides", "variant_overrides", "run_env", "run_variant"]

# Paper settings (docs): clip-higher 0.2/0.27 for GRPO; GSPO clips 3e-4/4e-4 on the sequence
# ratio; TIS truncates token importance weights at C=2 through verl's rollout_correction.
_GRPO = ["actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.27"]
_GSPO = [
    "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
    "actor_rollout_ref.actor.clip_ratio_low=0.0003",
    "actor_rollout_ref.actor.clip_ratio_high=0.0004",
    "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
]
_TIS = ["algorithm.rollout_correction.rollout_is=token", "algorithm.rollout_correction.rollout_is_threshold=2.0"]

VARIANTS: dict[str, dict] = {
    "grpo": {"algo": _GRPO, "replay": "disabled"},
    "grpo_r3": {"algo": _GRPO, "replay": "R3"},
    "grpo_tis": {"algo": _GRPO + _TIS, "replay": "disabled"},
    "gspo": {"algo": _GSPO, "replay": "disabled"},
    "gspo_r3": {"algo": _GSPO, "replay": "R3"},
    # Not in the quickstart's default set: R2 replays the trainer's own routing recorded in
    # compute_log_prob, so the rollout need not capture any.
    "grpo_r2": {"algo": _GRPO, "replay": "R2", "capture": False},
}
DEFAULT_VARIANTS = ("grpo", "grpo_r3", "grpo_tis", "gspo", "gspo_r3")

#: Rollout engines the quickstart runs (``actor_rollout_ref.rollout.name``).
ENGINES = cpu_settings.ENGINES


@dataclass
class RunSpec:
    model: str
    train_file: str
    val_file: str
    reward_file: str
    out_dir: str
    steps: int = 2
    prompts: int = 8  # prompts per step
    n: int = 4  # responses per prompt
    prompt_length: int = 64
    response_length: int = 8
    lr: float = 2e-4
    seed: int = 0
    rollout_engine: str = "vllm"
    rollout_dtype: str = "bfloat16"
    project: str = "verl_r3_quickstart"
    group: str = "quickstart"


def cpu_overrides(spec: RunSpec) -> list[str]:
    """verl settings for a CPU-only machine and ``spec``'s engine (``verl_r3.integration.cpu_settings``)."""
    return cpu_settings.cpu_overrides(spec.rollout_engine)


def variant_overrides(variant: str, spec: RunSpec) -> list[str]:
    """The full override list of ``variant`` (one of ``VARIANTS``) for ``spec``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown quickstart variant {variant!r}; one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    batch = spec.prompts * spec.n
    return [
        "algorithm.adv_estimator=grpo",
        "algorithm.use_kl_in_reward=False",
        f"data.train_files={spec.train_file}",
        f"data.val_files={spec.val_file}",
        f"data.train_batch_size={spec.prompts}",
        f"data.max_prompt_length={spec.prompt_length}",
        f"data.max_response_length={spec.response_length}",
        "data.filter_overlong_prompts=True",
        f"data.seed={spec.seed}",
        f"actor_rollout_ref.model.path={spec.model}",
        f"actor_rollout_ref.actor.optim.lr={spec.lr}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={spec.prompts}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={batch}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.entropy_coeff=0",
        f"++actor_rollout_ref.actor.fsdp_config.router_replay.mode={v['replay']}",
        f"actor_rollout_ref.rollout.name={spec.rollout_engine}",
        f"actor_rollout_ref.rollout.n={spec.n}",
        f"actor_rollout_ref.rollout.dtype={spec.rollout_dtype}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={batch}",
        # Routing is captured in every variant but R2: R3 replays it, the others measure against it.
        f"actor_rollout_ref.rollout.enable_rollout_routing_replay={v.get('capture', True)}",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        f"actor_rollout_ref.rollout.seed={spec.seed}",
        f"trainer.total_training_steps={spec.steps}",
        "trainer.total_epochs=1000",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file,wandb]",
        *wandb_naming.hydra_overrides(spec.project, spec.group, variant),
        f"trainer.default_local_dir={os.path.join(spec.out_dir, 'checkpoints', variant)}",
        f"reward.custom_reward_function.path={spec.reward_file}",
        "reward.custom_reward_function.name=compute_score",
        *v["algo"],
        *cpu_overrides(spec),
    ]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra) -> list[str]:
    """``base`` with every key that ``extra`` sets replaced by ``extra``'s value (Hydra refuses a key twice)."""
    keys = {_override_key(o) for o in extra}
    return [o for o in base if _override_key(o) not in keys] + list(extra)


def run_env(spec: RunSpec, variant: str, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({
        **cpu_settings.cpu_env(spec.rollout_engine),
        "VERL_FILE_LOGGER_PATH": os.path.join(spec.out_dir, f"{variant}.jsonl"),
        **wandb_naming.wandb_env(spec.project, spec.group, variant, base_env=env,
                                 wandb_dir=os.path.join(spec.out_dir, "wandb")),
    })
    if spec.rollout_engine == "sglang":
        # SGLang's environment runs verl_r3 from this checkout (it is not installed there).
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def run_variant(variant: str, spec: RunSpec, *, timeout_s: float = 900, extra: list[str] = (),
                log_path: str | None = None, python: str | None = None, env: dict | None = None,
                logged_steps: int | None = None) -> dict:
    """Run ``main_ppo`` for ``variant`` with ``python`` (default: this interpreter); returns
    {"returncode", "seconds", "log", "metrics"}. ``env`` entries are set on top of the run's
    environment (``run_env``); ``logged_steps`` is how many steps the run must log (default
    ``spec.steps``; fewer when it resumes from a checkpoint).

    Raises ``RuntimeError`` (with the log's tail) when the run fails or exceeds ``timeout_s``.
    """
    os.makedirs(os.path.join(spec.out_dir, "wandb"), exist_ok=True)
    log_path = log_path or os.path.join(spec.out_dir, f"{variant}.log")
    cmd = [python or sys.executable, "-m", "verl.trainer.main_ppo", *merge_overrides(variant_overrides(variant, spec), extra)]
    start = time.time()
    with open(log_path, "w") as log:
        code = run_child(cmd, timeout_s=timeout_s, stdout=log, stderr=subprocess.STDOUT,
                         env={**run_env(spec, variant), **(env or {})}).returncode
    seconds = time.time() - start
    metrics_path = os.path.join(spec.out_dir, f"{variant}.jsonl")
    metrics = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    expected = spec.steps if logged_steps is None else logged_steps
    if code != 0 or len(metrics) < expected:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-6000:]
        why = f"timed out after {timeout_s:.0f}s" if code is None else f"exited with {code}"
        raise RuntimeError(f"main_ppo for {variant} {why} with {len(metrics)}/{expected} steps logged "
                           f"(log: {log_path}):\n{tail}")
    return {"returncode": code, "seconds": seconds, "log": log_path, "metrics": metrics}
