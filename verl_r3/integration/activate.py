"""Load verl_r3 into every verl process: ``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate``.

verl imports the modules named in VERL_USE_EXTERNAL_MODULES during ``import verl`` in every
process it starts (driver, task runner, Ray workers). Importing this one:

- registers the CPU platform (``verl_r3.integration.cpu_platform``; it only takes effect
  with ``VERL_PLATFORM=cpu``) and, on that platform, verl's FSDP engines for device ``cpu``;
- registers ``FSDPReplayEngine`` (``verl_r3.integration.fsdp_replay``) for fsdp/fsdp2, so
  ``router_replay.mode`` on the FSDP engine config selects R3 or R2 (``disabled`` is verl's
  engine unchanged);
- registers the rollout engine ``hf`` (``verl_r3.integration.hf_rollout``), selected with
  ``actor_rollout_ref.rollout.name=hf``.
"""

from verl_r3.integration import cpu_platform
from verl_r3.integration.fsdp_cpu import register_cpu_engines
from verl_r3.integration.fsdp_replay import register_replay_engines
from verl_r3.integration.hf_rollout import register_hf_rollout

if cpu_platform.is_selected():
    register_cpu_engines()
register_replay_engines()
register_hf_rollout()
