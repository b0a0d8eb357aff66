"""Every recipe script's command composes into verl 0.9.1's trainer config, with the variant's settings.

Each run script is asked for its command (``DRY_RUN=1``); the command's config path, config name and
overrides are composed with Hydra exactly as ``main_ppo`` would, and verl's own dataclasses are built
from the actor, rollout and algorithm sections. Nothing is grepped: the values asserted are the
composed config's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("verl")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from recipe_scripts import MODELS, NAMES, RECIPES, ROOT, VARIANTS, compose, dry_run, recipe_env, script  # noqa: E402

from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

from verl_r3.quickstart import runner  # noqa: E402


def _replay_mode(cfg, backend: str) -> str:
    actor = cfg.actor_rollout_ref.actor
    return actor.megatron.router_replay.mode if backend == "megatron" else actor.fsdp_config.router_replay.mode


def _check_variant(cfg, variant: str, backend: str) -> None:
    actor, rollout = cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout
    assert _replay_mode(cfg, backend) == ("R3" if variant.endswith("_r3") else "disabled")
    # every variant captures routing: R3 replays it, the others measure their disagreement with it
    assert rollout.enable_rollout_routing_replay is True and rollout.calculate_log_probs is True
    assert cfg.algorithm.adv_estimator == "grpo"
    if variant.startswith("gspo"):
        assert actor.policy_loss.loss_mode == "gspo"
        assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.0003, 0.0004)
        assert actor.loss_agg_mode == "seq-mean-token-mean"
    else:
        assert actor.policy_loss.loss_mode == "vanilla"
        assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.27)
    if variant == "grpo_tis":
        assert cfg.algorithm.rollout_correction.rollout_is == "token"
        assert cfg.algorithm.rollout_correction.rollout_is_threshold == 2.0
    else:
        assert cfg.algorithm.rollout_correction.rollout_is is None


@pytest.mark.parametrize("recipe", NAMES)
@pytest.mark.parametrize("backend", ["fsdp", "megatron"])
@pytest.mark.slow
def test_every_script_composes_with_its_variant(recipe, backend, tmp_path):
    cases = [(model, variant) for model in MODELS for variant in VARIANTS]
    # The scripts' DRY_RUN subprocesses run side by side; Hydra composes in this process, one at a time.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        printed = list(pool.map(lambda case: dry_run(script(recipe, *case), TRAIN_BACKEND=backend, OUT=str(tmp_path)),
                                cases))
    for (model, variant), (envs, command) in zip(cases, printed):
        cfg = compose(command)
        _check_variant(cfg, variant, backend)
        assert cfg.actor_rollout_ref.actor.strategy == ("megatron" if backend == "megatron" else "fsdp2")
        assert cfg.reward.custom_reward_function.path == str(RECIPES / recipe / "reward.py")
        assert cfg.trainer.project_name == f"verl_r3_{recipe}"
        assert cfg.trainer.experiment_name.endswith(f"-{variant}")
        assert envs["VERL_USE_EXTERNAL_MODULES"] == "verl_r3.integration.activate"
        assert envs["VERL_FILE_LOGGER_PATH"] == str(tmp_path / f"{variant}.jsonl")
        # verl's own config classes accept what was composed
        omega_conf_to_dataclass(cfg.algorithm)
        if backend == "fsdp":
            omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
            omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)


def test_paper_settings_and_presets():
    cfg = compose(dry_run(script("math", "qwen3_30b_a3b", "grpo_r3"), NNODES="4")[1])
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n) == (256, 8)
    assert (cfg.data.max_prompt_length, cfg.data.max_response_length) == (2048, 30720)
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-6
    assert cfg.data.train_batch_size // cfg.actor_rollout_ref.actor.ppo_mini_batch_size == 8  # mini-steps
    assert cfg.algorithm.filter_groups.enable is True  # dynamic sampling
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (4, 8)
    assert cfg.actor_rollout_ref.model.path == "Qwen/Qwen3-30B-A3B"
    assert cfg.actor_rollout_ref.actor.fsdp_config.param_offload is False

    one_node = compose(dry_run(script("math", "qwen3_30b_a3b", "grpo_r3"))[1])
    assert (one_node.trainer.nnodes, one_node.data.train_batch_size, one_node.data.max_response_length) == (1, 64, 8192)
    assert one_node.data.train_batch_size // one_node.actor_rollout_ref.actor.ppo_mini_batch_size == 8
    assert one_node.actor_rollout_ref.actor.fsdp_config.optimizer_offload is True

    small = compose(dry_run(script("code", "olmoe_1b_7b", "gspo"))[1])
    assert (small.trainer.n_gpus_per_node, small.actor_rollout_ref.rollout.tensor_model_parallel_size) == (1, 1)
    assert small.actor_rollout_ref.model.path == "allenai/OLMoE-1B-7B-0125-Instruct"


@pytest.mark.parametrize("engine", ["vllm", "sglang", "hf"])
def test_the_engine_is_one_value(engine):
    base = compose(dry_run(script("math", "olmoe_1b_7b", "grpo_r3"))[1])
    cfg = compose(dry_run(script("math", "olmoe_1b_7b", "grpo_r3"), ROLLOUT_ENGINE=engine)[1])
    assert cfg.actor_rollout_ref.rollout.name == engine
    ours, theirs = _flatten(cfg), _flatten(base)
    diff = {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)}
    assert diff <= {"actor_rollout_ref.rollout.name"}, diff


def _flatten(cfg, prefix=""):
    from omegaconf import OmegaConf

    out = {}
    for key, value in OmegaConf.to_container(cfg, resolve=False).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(OmegaConf.create(value), name + "."))
        else:
            out[name] = value
    return out


def test_agent_recipe_runs_the_tool_loop_with_limits():
    cfg = compose(dry_run(script("agent", "qwen3_30b_a3b", "grpo_r3"))[1])
    rollout = cfg.actor_rollout_ref.rollout
    assert rollout.multi_turn.enable is True and rollout.multi_turn.format == "hermes"
    assert rollout.multi_turn.max_assistant_turns == 8 and cfg.r3_agent.turn_max_tokens == 2048
    assert rollout.multi_turn.function_tool_path == str(RECIPES / "agent" / "python_tool.py")
    assert rollout.agent.agent_loop_config_path == str(RECIPES / "agent" / "config" / "agent_loops.yaml")
    assert rollout.agent.default_agent_loop == "r3_tool_agent"


def test_smoke_commands_compose_on_cpu_settings(tmp_path):
    for recipe in NAMES:
        envs, command = dry_run(script(recipe, "qwen3_30b_a3b", "grpo_r3"), SMOKE="1", SMOKE_DIR=str(tmp_path))
        assert command[:4] == ["timeout", "--kill-after=30", "900", sys.executable], command[:4]
        cfg = compose(command[3:])
        assert cfg.trainer.device == "cpu" and cfg.trainer.total_training_steps == 2
        assert cfg.actor_rollout_ref.model.path == str(tmp_path / "model")
        assert cfg.data.train_files == str(tmp_path / "data" / "train.parquet")
        assert envs["VERL_PLATFORM"] == "cpu"
        _check_variant(cfg, "grpo_r3", "fsdp")


def test_variants_match_the_quickstart():
    """The recipes and the quickstart state the same algorithm settings for each variant."""
    for variant in VARIANTS:
        command = dry_run(script("math", "olmoe_1b_7b", variant))[1]
        ours = {o for o in command if o.startswith(("actor_rollout_ref.actor.clip", "actor_rollout_ref.actor.policy_loss",
                                                    "actor_rollout_ref.actor.loss_agg", "algorithm.rollout_correction"))}
        assert ours == set(runner.VARIANTS[variant]["algo"]), variant
        assert f"++actor_rollout_ref.actor.fsdp_config.router_replay.mode={runner.VARIANTS[variant]['replay']}" in command


def test_arguments_override_and_are_not_repeated():
    command = dry_run(script("code", "olmoe_1b_7b", "grpo"), "data.train_batch_size=8", "trainer.nnodes=1")[1]
    keys = [re.sub(r"^[+~]+", "", o.split("=", 1)[0]) for o in command if "=" in o]
    assert len(keys) == len(set(keys))  # Hydra refuses a key given twice
    assert compose(command).data.train_batch_size == 8


@pytest.mark.parametrize("env, message", [
    ({"ROLLOUT_ENGINE": "trtllm"}, "ROLLOUT_ENGINE must be vllm, sglang or hf, got 'trtllm'"),
    ({"TRAIN_BACKEND": "deepspeed"}, "TRAIN_BACKEND must be fsdp or megatron, got 'deepspeed'"),
    ({"SMOKE": "1", "TRAIN_BACKEND": "megatron"}, "SMOKE runs TRAIN_BACKEND=fsdp"),
])
def test_bad_knobs_are_refused(env, message):
    proc = subprocess.run(["bash", str(script("math", "olmoe_1b_7b", "grpo_r3"))], env=recipe_env(DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_bad_variant_and_model_are_refused(tmp_path):
    for body, message in (("RECIPE=math MODEL=olmoe_1b_7b VARIANT=ppo", "VARIANT must be grpo, grpo_r3, grpo_tis, gspo or gspo_r3"),
                          ("RECIPE=math MODEL=llama VARIANT=grpo", "unknown MODEL 'llama'"),
                          ("RECIPE=chess MODEL=olmoe_1b_7b VARIANT=grpo", "no recipe folder")):
        path = tmp_path / "run.sh"
        path.write_text(f"{body}\nsource {RECIPES / 'common.sh'}\n")
        proc = subprocess.run(["bash", str(path)], env=recipe_env(DRY_RUN="1"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (body, proc.stderr)


def test_every_recipe_has_its_files():
    for recipe in NAMES:
        folder = RECIPES / recipe
        for name in ("README.md", "prepare_data.py", "reward.py", "recipe.sh", f"config/r3_{recipe}.yaml",
                     f"config/r3_{recipe}_megatron.yaml", "config/deltas.yaml"):
            assert (folder / name).is_file(), folder / name
        scripts = sorted(p.name for p in folder.glob("run_*.sh"))
        assert scripts == sorted(f"run_{m}_{v}.sh" for m in MODELS for v in VARIANTS)
