"""Patch: routing carried one byte per expert id through verl's v1 trainer (verl 0.9.x).

What it patches
    ``verl.experimental.agent_loop.agent_loop.AgentLoopOutput.as_dict`` and
    ``verl.trainer.ppo.v1.agent_loop_tq.AgentLoopWorkerTQ._agent_loop_postprocess`` (verl 0.9.1).
    The second converts each output's ``routed_experts`` to ``verl_r3.core.record.compact_rows``
    (``uint8`` for models with at most 256 experts) before verl's code runs, and only when the
    actor's ``strategy`` is ``fsdp`` or ``fsdp2`` (the engine of ``verl_r3.integration.fsdp_replay``
    reads it); the first keeps a ``uint8`` tensor ``uint8`` where verl converts every routing
    to ``int16``. Everything else about the field is verl's: one ``[prompt + response, L, K]``
    block per sample, rows after the engine's last one zero.

Why
    verl's v1 agent loop stores each sample's routing as ``int16`` in TransferQueue, and the
    trainer fetches it from there for every ``compute_log_prob`` and ``update_actor``: two bytes
    per (token, layer, k) where one holds every expert id of models with up to 256 experts
    (Qwen3-MoE 128, DeepSeek-V3 256, OLMoE 64, Mixtral 8). Routing is the largest per-token
    field of an R3 batch (48 layers x top-8 = 384 ids per token for Qwen3-30B-A3B, against one
    token id), so this halves the host memory of the step's routing and its transfers
    (``verl-r3 bench memory``).

Upstream reference
    verl 0.9.1, ``verl/experimental/agent_loop/agent_loop.py`` (``AgentLoopOutput.as_dict``:
    ``routed_experts = torch.tensor(routed_experts, dtype=torch.int16)``) and
    ``verl/trainer/ppo/v1/agent_loop_tq.py`` (``AgentLoopWorkerTQ._agent_loop_postprocess``,
    which puts ``as_dict()`` into TransferQueue).

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build), transformers 5.19.

Remove when
    verl stores routing in the narrowest dtype of the model's expert count.

Applied by ``verl_r3.integration.activate`` in every verl process, never on import of this module.
Megatron and VeOmni actors keep verl's ``int16`` (their replay code is verl's own).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging

import numpy as np
import torch

from verl_r3.core.record import compact_rows
from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
_OUTPUT = ("verl.experimental.agent_loop.agent_loop", "AgentLoopOutput", "as_dict")
_WORKER = ("verl.trainer.ppo.v1.agent_loop_tq", "AgentLoopWorkerTQ", "_agent_loop_postprocess")
#: Actor strategies whose engine reads compact routing (verl_r3.integration.fsdp_replay).
COMPACT_STRATEGIES = ("fsdp", "fsdp2")

_original: dict = {}  # target -> verl's function while applied


def installed_verl_version() -> str | None:
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_agent_loop_routing_0_9", "verl", installed_verl_version(), SUPPORTED,
        "check whether AgentLoopOutput.as_dict still converts routed_experts to int16 and add a patch module "
        "for its version window if it does",
    )


def _as_compact_tensor(routed) -> torch.Tensor:
    if isinstance(routed, np.ndarray):
        routed = torch.from_numpy(np.ascontiguousarray(routed))
    elif not isinstance(routed, torch.Tensor):
        routed = torch.as_tensor(np.asarray(routed))
    return compact_rows(routed.detach().cpu())


def _keeping_uint8(original):
    """verl's ``as_dict``, with a ``uint8`` routing tensor kept ``uint8`` (aligned as verl aligns it)."""

    @functools.wraps(original)
    def as_dict(self):
        routed = self.routed_experts
        if not (isinstance(routed, torch.Tensor) and routed.dtype == torch.uint8):
            return original(self)
        self.routed_experts = None
        try:
            output = original(self)
        finally:
            self.routed_experts = routed
        total = output["prompts"].size(0) + output["responses"].size(0)
        aligned = routed.new_zeros((total, *routed.shape[1:]))
        rows = min(routed.shape[0], total)
        aligned[:rows] = routed[:rows]
        output["routed_experts"] = aligned
        return output

    return as_dict


def _compacting(original):
    """verl's ``_agent_loop_postprocess`` with every output's routing compacted first (FSDP actors)."""

    @functools.wraps(original)
    async def _agent_loop_postprocess(self, output, validate, **kwargs):
        strategy = self.config.actor_rollout_ref.actor.get("strategy", None)
        if strategy in COMPACT_STRATEGIES:
            for item in output if isinstance(output, list) else [output]:
                if item is not None and item.routed_experts is not None:
                    item.routed_experts = _as_compact_tensor(item.routed_experts)
        return await original(self, output, validate, **kwargs)

    return _agent_loop_postprocess


def _plain_class(obj, name: str):
    """The class itself: verl declares the worker ``@ray.remote``, whose module attribute is Ray's
    actor handle; the class Ray instantiates in the actor process subclasses the declared one."""
    metadata = getattr(obj, "__ray_metadata__", None)
    if metadata is None:
        return obj
    for cls in metadata.modified_class.__mro__:
        if cls.__name__ == name and cls.__module__ == obj.__module__:
            return cls
    raise RuntimeError(f"verl_agent_loop_routing_0_9: no class {name} behind Ray's actor class {obj!r}")


def _targets():
    for module, cls_name, method in (_OUTPUT, _WORKER):
        yield (module, cls_name, method), _plain_class(getattr(importlib.import_module(module), cls_name), cls_name)


def is_applied() -> bool:
    return bool(_original)


def apply() -> bool:
    """Install both replacements. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    found = {}
    for target, cls in _targets():
        current = cls.__dict__.get(target[2])
        if current is None:
            raise RuntimeError(f"verl_agent_loop_routing_0_9: {target[0]}.{target[1]}.{target[2]} is missing")
        found[target] = (cls, current)
    (_, as_dict), (_, postprocess) = found[_OUTPUT], found[_WORKER]
    try:
        source = inspect.getsource(as_dict)
    except (OSError, TypeError):
        source = None
    if source is not None and "dtype=torch.int16" not in source:
        raise RuntimeError(f"verl_agent_loop_routing_0_9: AgentLoopOutput.as_dict of verl {version} no longer "
                           "converts routed_experts to int16; review this patch")
    if not inspect.iscoroutinefunction(postprocess):
        raise RuntimeError("verl_agent_loop_routing_0_9: AgentLoopWorkerTQ._agent_loop_postprocess is not a coroutine")
    for target, (cls, current) in found.items():
        _original[target] = current
        setattr(cls, target[2], (_keeping_uint8 if target == _OUTPUT else _compacting)(current))
    logger.info("verl_agent_loop_routing_0_9: verl %s: routing of FSDP actors carried as uint8 where it fits", version)
    return True


def revert() -> bool:
    """Restore verl's functions. Idempotent."""
    if not _original:
        return False
    for target, cls in _targets():
        current = cls.__dict__.get(target[2])
        if target in _original and getattr(current, "__wrapped__", None) is _original[target]:
            setattr(cls, target[2], _original[target])
    _original.clear()
    logger.info("verl_agent_loop_routing_0_9: restored AgentLoopOutput.as_dict and "
                "AgentLoopWorkerTQ._agent_loop_postprocess")
    return True
