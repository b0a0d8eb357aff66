"""Which rollout servers of a verl trainer are dead: the cause to name when a step fails.

verl's v1 agent loop records every request to a dead rollout server (vLLM, SGLang or ``hf``) as
a failed trajectory and carries on; the step then fails in verl's replay buffer ("terminal groups
with no materializable trajectories"), an error that does not say why. When a step fails,
``explain_step_failure`` asks each server of the trainer's rollout replicas whether it is alive
and, if some are not, raises an error naming them, chained to verl's.

Called from ``verl_r3.integration.step_metrics.TrainerHooks.step_failed`` (patched into verl's
v1 trainer by ``patches/verl_trainer_step_metrics_0_9.py``).
"""

from __future__ import annotations

import logging

__all__ = ["RolloutServerDied", "dead_rollout_servers", "explain_step_failure"]

logger = logging.getLogger(__name__)

#: Seconds a live server has to answer.
PROBE_TIMEOUT_S = 10.0


class RolloutServerDied(RuntimeError):
    """A training step failed and rollout servers of the run are dead."""


def _describe(server) -> str:
    descriptor = getattr(server, "_ray_actor_creation_function_descriptor", None)
    name = getattr(descriptor, "class_name", None) or type(server).__name__
    actor_id = getattr(server, "_actor_id", None)
    return f"{name} (actor {actor_id.hex()[:12]})" if actor_id is not None else name


def dead_rollout_servers(trainer, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """``"replica R: <server>: <why>"`` for every rollout server of ``trainer`` that is dead or does
    not answer within ``timeout_s``; empty when all answer (or the trainer has no rollout replicas)."""
    import ray

    manager = getattr(trainer, "llm_server_manager", None)
    replicas = getattr(manager, "rollout_replicas", None) or []
    probes = [(rank, server, server.__ray_ready__.remote())
              for rank, replica in enumerate(replicas) for server in getattr(replica, "servers", None) or []]
    dead = []
    for rank, server, probe in probes:
        try:
            ray.get(probe, timeout=timeout_s)
        except ray.exceptions.RayActorError as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            dead.append(f"replica {rank}: {_describe(server)}: {why}")
        except ray.exceptions.GetTimeoutError:
            dead.append(f"replica {rank}: {_describe(server)}: no answer within {timeout_s:.0f} s")
    return dead


def explain_step_failure(trainer, error: BaseException) -> None:
    """Raise ``RolloutServerDied`` from ``error`` when rollout servers of ``trainer`` are dead;
    return (and let ``error`` propagate) otherwise, or when the probe itself fails."""
    try:
        dead = dead_rollout_servers(trainer)
    except Exception as exc:  # noqa: BLE001 - the probe must never hide the step's own error
        logger.warning("could not probe the rollout servers after a failed step: %r", exc)
        return
    if dead:
        step = getattr(trainer, "global_steps", None)
        raise RolloutServerDied(
            f"training step {step} failed and {len(dead)} rollout server(s) are dead: " + "; ".join(dead)
            + f". The requests they were serving failed. verl reported: {type(error).__name__}: {error}"
        ) from error
