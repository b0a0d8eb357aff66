"""Shared by the recipe tests: the run scripts, their DRY_RUN output, and verl's config composed from it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
NAMES = ("math", "code", "agent")
MODELS = ("qwen3_30b_a3b", "olmoe_1b_7b")
VARIANTS = ("grpo", "grpo_r3", "grpo_tis", "gspo", "gspo_r3")


def script(recipe: str, model: str, variant: str) -> Path:
    return RECIPES / recipe / f"run_{model}_{variant}.sh"


def recipe_env(**extra: str) -> dict:
    """The environment a user would have: this interpreter, no W&B login, nothing of verl_r3's set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "VERL_", "SMOKE", "DRY_RUN", "ROLLOUT_ENGINE", "TRAIN_BACKEND"))}
    env.update(PYTHON=sys.executable, WANDB_MODE="offline", **extra)
    return env


def dry_run(path: Path, *args: str, **env: str) -> tuple[dict, list[str]]:
    """(environment lines, command) that ``DRY_RUN=1 bash path args`` prints."""
    proc = subprocess.run(["bash", str(path), *args], env=recipe_env(DRY_RUN="1", **env), capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    envs = dict(line[4:].split("=", 1) for line in lines if line.startswith("env "))
    return envs, [line for line in lines if not line.startswith("env ")]


def compose(command: list[str]):
    """verl's trainer config that ``python -m verl.trainer.main_ppo --config-path P --config-name N ...`` builds."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    assert command[1:3] == ["-m", "verl.trainer.main_ppo"], command[:3]
    cut = command.index("--config-name")
    path, name, overrides = command[command.index("--config-path") + 1], command[cut + 1], command[cut + 2:]
    with initialize_config_dir(config_dir=path, version_base=None):
        return hydra_compose(config_name=name, overrides=overrides)


def load_recipe_module(recipe: str, name: str):
    """``recipes/<recipe>/<name>.py`` as a module (the recipe folders are not packages)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{recipe}_{name}", RECIPES / recipe / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
