"""What a verl run with verl_r3 needs on a CPU-only machine: Hydra overrides and environment.

The quickstart, the recipes' ``SMOKE=1`` mode and the tests all run verl's trainer on CPU with
these settings; nothing here changes a GPU run.

Python::

    from verl_r3.integration import cpu_settings
    overrides += cpu_settings.cpu_overrides("vllm")
    env.update(cpu_settings.cpu_env("vllm"))

Shell (``recipes/common.sh``)::

    mapfile -t CPU_OVERRIDES < <(python -m verl_r3.integration.cpu_settings --engine vllm)
    eval "$(python -m verl_r3.integration.cpu_settings --engine vllm --env)"   # export NAME=value lines
"""

from __future__ import annotations

import argparse
import shlex
import sys

__all__ = ["ENGINES", "SGLANG_CPU_OVERRIDES", "cpu_env", "cpu_overrides", "main"]

#: Rollout engines that run on CPU (``actor_rollout_ref.rollout.name``): verl's vLLM server on
#: vLLM's CPU build, verl's SGLang server (in SGLang's own environment), or verl_r3's ``hf``.
ENGINES = ("vllm", "sglang", "hf")

_COMMON = (
    "trainer.device=cpu",
    "trainer.nnodes=1",
    "trainer.n_gpus_per_node=1",
    "+ray_kwargs.ray_init.num_gpus=1",  # logical GPUs: verl's resource pools ask Ray for them
    "ray_kwargs.ray_init.num_cpus=16",  # logical; placement bundles ask for 3 CPUs a worker
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",  # 8 storage actors hang on 2 cores
    "reward.num_workers=1",
    "data.dataloader_num_workers=0",  # worker processes only cost memory here
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.ref.strategy=fsdp2",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "actor_rollout_ref.actor.fsdp_config.dtype=float32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
    "+actor_rollout_ref.model.override_config.attn_implementation=eager",
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    # vLLM's CPU build: no sleep mode (it needs an accelerator), no graph compilation.
    "+actor_rollout_ref.rollout.enable_sleep_mode=False",
    "actor_rollout_ref.rollout.enforce_eager=True",
)

#: verl's SGLang rollout on SGLang's CPU device (with ``VERL_R3_SGLANG_CPU=1``, see ``cpu_env``).
#: SGLang's memory release synchronizes a CUDA device, hence ``free_cache_engine=False``.
SGLANG_CPU_OVERRIDES = (
    "+actor_rollout_ref.rollout.engine_kwargs.sglang.device=cpu",
    "+actor_rollout_ref.rollout.engine_kwargs.sglang.attention_backend=torch_native",
    "+actor_rollout_ref.rollout.engine_kwargs.sglang.enable_memory_saver=False",
    "+actor_rollout_ref.rollout.engine_kwargs.sglang.max_total_tokens=4096",
    "actor_rollout_ref.rollout.free_cache_engine=False",
)


def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown rollout engine {engine!r} for a CPU run; one of {', '.join(ENGINES)}")
    return engine


def cpu_overrides(engine: str = "vllm") -> list[str]:
    """verl settings for a CPU-only machine (CPU platform, FSDP2 in fp32, one worker) and ``engine``."""
    return [*_COMMON, *(SGLANG_CPU_OVERRIDES if _check_engine(engine) == "sglang" else ())]


def cpu_env(engine: str = "vllm") -> dict[str, str]:
    """Environment of a CPU run: verl_r3 loaded in every verl process, verl's CPU platform, quiet logs."""
    env = {
        "VERL_USE_EXTERNAL_MODULES": "verl_r3.integration.activate",
        "VERL_PLATFORM": "cpu",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
        "PYTHONUNBUFFERED": "1",
    }
    if _check_engine(engine) == "sglang":
        env["VERL_R3_SGLANG_CPU"] = "1"  # SGLang's CPU fixes, in every verl and SGLang process
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl_r3.integration.cpu_settings",
                                     description="Print the Hydra overrides (one per line) or, with --env, the "
                                                 "environment (export lines) of a verl run on CPU.")
    parser.add_argument("--engine", default="vllm", help=f"rollout engine: {' | '.join(ENGINES)}")
    parser.add_argument("--env", action="store_true", help="print `export NAME=value` lines instead")
    args = parser.parse_args(argv)
    try:
        lines = ([f"export {k}={shlex.quote(v)}" for k, v in cpu_env(args.engine).items()] if args.env
                 else cpu_overrides(args.engine))
    except ValueError as exc:
        parser.error(str(exc))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
