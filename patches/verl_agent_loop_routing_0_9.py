"""Patch: routing checked and carried one byte per expert id through verl's agent loop (verl 0.9.x).

What it patches
    ``verl.experimental.agent_loop.agent_loop.AgentLoopOutput.as_dict``,
    ``verl.experimental.agent_loop.agent_loop.AgentLoopWorker._agent_loop_postprocess`` (verl's
    legacy trainer) and ``verl.trainer.ppo.v1.agent_loop_tq.AgentLoopWorkerTQ._agent_loop_postprocess``
    (the v1 trainer; verl 0.9.1). Both postprocess wrappers check every output's routing before
    verl's code runs, when the rollout returns routing
    (``actor_rollout_ref.rollout.enable_rollout_routing_replay``):

    * routing with more rows than the sample has tokens (a response cut after generation while
      its routing was not) raises ``ValueError`` naming the sample; verl would cut it silently;
    * an output without routing (the engine dropped it) gets an empty block, logged with the
      sample's name: verl's alignment zero-fills it, and the FSDP replay engine reads zero rows as
      rows without routing, so the sample's tokens take the documented fallback (native routing,
      counted in ``r3/fallback_frac``). verl's legacy trainer would otherwise drop every sample's
      routing when the first output of a batch has none, or fail on a later one;
    * with top-1 routing a zero row is a real expert, so the v1 wrapper pads such routing with
      ``-1`` itself; verl's legacy trainer zero-fills, and there routing shorter than
      ``tokens - 1`` rows raises ``ValueError`` instead of replaying expert 0.

    For FSDP actors (``strategy`` fsdp/fsdp2, the engine of ``verl_r3.integration.fsdp_replay``) the
    v1 wrapper then converts the routing to ``verl_r3.core.record.compact_rows`` (``uint8`` for
    models with at most 256 experts), and ``as_dict`` keeps a ``uint8`` tensor ``uint8`` where verl
    converts every routing to ``int16`` (aligned as verl aligns it: rows after the engine's last
    one zero).

Why
    verl's v1 agent loop stores each sample's routing as ``int16`` in TransferQueue, and the
    trainer fetches it from there for every ``compute_log_prob`` and ``update_actor``: two bytes
    per (token, layer, k) where one holds every expert id of models with up to 256 experts
    (Qwen3-MoE 128, DeepSeek-V3 256, OLMoE 64, Mixtral 8). Routing is the largest per-token
    field of an R3 batch (48 layers x top-8 = 384 ids per token for Qwen3-30B-A3B, against one
    token id), so this halves the host memory of the step's routing and its transfers
    (``verl-r3 bench memory``). And verl's alignment drops rows and samples without a word.

Upstream reference
    verl 0.9.1, ``verl/experimental/agent_loop/agent_loop.py`` (``AgentLoopOutput.as_dict``:
    ``routed_experts = torch.tensor(routed_experts, dtype=torch.int16)`` and zero-filled
    alignment; ``AgentLoopWorker._agent_loop_postprocess`` and ``_postprocess``, which keeps
    routing only when the batch's first output has it) and
    ``verl/trainer/ppo/v1/agent_loop_tq.py`` (``AgentLoopWorkerTQ._agent_loop_postprocess``,
    which puts ``as_dict()`` into TransferQueue).

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build), transformers 5.19.

Remove when
    verl stores routing in the narrowest dtype of the model's expert count, marks rows without
    routing, and refuses routing that does not fit its sample.

Applied by ``verl_r3.integration.activate`` in every verl process, never on import of this module.
Megatron and VeOmni actors keep verl's ``int16`` (their replay code is verl's own).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import sys

import numpy as np
import torch

from verl_r3.core.record import compact_rows
from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
_OUTPUT = ("verl.experimental.agent_loop.agent_loop", "AgentLoopOutput", "as_dict")
_LEGACY_WORKER = ("verl.experimental.agent_loop.agent_loop", "AgentLoopWorker", "_agent_loop_postprocess")
_WORKER = ("verl.trainer.ppo.v1.agent_loop_tq", "AgentLoopWorkerTQ", "_agent_loop_postprocess")
_TARGETS = (_OUTPUT, _LEGACY_WORKER, _WORKER)
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


def _as_tensor(routed) -> torch.Tensor:
    if isinstance(routed, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(routed))
    if isinstance(routed, torch.Tensor):
        return routed.detach().cpu()
    return torch.as_tensor(np.asarray(routed))


def _sample_name(kwargs: dict, index: int, count: int) -> str:
    """The sample as verl keys it in TransferQueue (``{uid}_{session_id}_{index}``), or what is known."""
    uid, session = kwargs.get("uid"), kwargs.get("session_id")
    if uid is not None and session is not None:
        return f"{uid}_{session}_{index}"
    return f"{uid if uid is not None else '?'} (output {index} of {count})"


def check_routing(worker, outputs: list, kwargs: dict, *, legacy: bool) -> None:
    """Check each output's routing against its sample and fill in what the engine did not return
    (see the module docstring); ``legacy``: verl's legacy trainer, which zero-fills every routing."""
    rollout = getattr(worker, "rollout_config", None)
    if rollout is None or not getattr(rollout, "enable_rollout_routing_replay", False):
        return
    for index, item in enumerate(outputs):
        if item is None:
            continue
        name = _sample_name(kwargs, index, len(outputs))
        tokens = len(item.prompt_ids) + len(item.response_ids)
        if item.routed_experts is None:
            from verl_r3.core.replay import routing_dims

            layers, top_k, _ = routing_dims(worker.model_config.hf_config)
            logger.warning("verl_agent_loop_routing_0_9: sample %s: the rollout engine returned no routing; its %d "
                           "tokens take the fallback (native routing, counted in r3/fallback_frac)", name, tokens)
            item.routed_experts = torch.zeros((0, layers, top_k), dtype=torch.uint8)
            if top_k > 1:
                continue
        routed = _as_tensor(item.routed_experts)
        if routed.dim() != 3:
            raise ValueError(f"sample {name}: routed_experts must be [rows, layers, top_k], got {tuple(routed.shape)}")
        rows, top_k = routed.shape[0], routed.shape[2]
        if rows > tokens:
            raise ValueError(
                f"sample {name}: routing has {rows} rows but the sample has {tokens} tokens (prompt "
                f"{len(item.prompt_ids)} + response {len(item.response_ids)}): a response cut after generation "
                "while its routing was not, or routing of another request")
        if top_k == 1 and rows < tokens - 1:  # top-1: a zero row would read as expert 0
            if legacy:
                raise ValueError(
                    f"sample {name}: top-1 routing covers {rows} of {tokens} tokens, and verl's legacy trainer fills "
                    "the rest with expert 0; run the v1 trainer (trainer.use_v1=True) for samples with unrouted tokens")
            padded = torch.full((tokens, *routed.shape[1:]), -1, dtype=torch.int16)
            padded[:rows] = routed.to(torch.int16)
            item.routed_experts = padded


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


def _checking(original, *, legacy: bool):
    """verl's ``_agent_loop_postprocess`` with every output's routing checked first and, in the v1
    trainer for FSDP actors, compacted."""

    @functools.wraps(original)
    async def _agent_loop_postprocess(self, output, validate, **kwargs):
        outputs = output if isinstance(output, list) else [output]
        check_routing(self, outputs, kwargs, legacy=legacy)
        if not legacy and self.config.actor_rollout_ref.actor.get("strategy", None) in COMPACT_STRATEGIES:
            for item in outputs:
                if item is not None and item.routed_experts is not None:
                    item.routed_experts = compact_rows(_as_tensor(item.routed_experts))
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


def _targets(*, import_v1: bool):
    """(target, class) of each target whose module is imported (or importable, for the agent loop);
    verl's v1 worker only once its module has finished importing, so a hook on the agent loop's
    import (which the v1 module triggers) does not import the v1 module half-way."""
    for target in _TARGETS:
        module_name, cls_name, _ = target
        if target == _WORKER and not import_v1:
            module = sys.modules.get(module_name)
            if module is None or not hasattr(module, cls_name):
                continue
        else:
            module = importlib.import_module(module_name)
        yield target, _plain_class(getattr(module, cls_name), cls_name)


def _replacement(target, current):
    if target == _OUTPUT:
        return _keeping_uint8(current)
    return _checking(current, legacy=target == _LEGACY_WORKER)


def is_applied() -> bool:
    return bool(_original)


def apply(*, import_v1: bool = True) -> bool:
    """Install the replacements. Returns True if this call changed anything (idempotent).

    ``import_v1=False`` leaves verl's v1 worker alone until its module is imported (then call
    ``apply`` again: ``verl_r3.integration.activate`` does, on both imports)."""
    version = check_version()
    found = {}
    for target, cls in _targets(import_v1=import_v1):
        if target in _original:
            continue
        current = cls.__dict__.get(target[2])
        if current is None:
            raise RuntimeError(f"verl_agent_loop_routing_0_9: {target[0]}.{target[1]}.{target[2]} is missing")
        if target == _OUTPUT:
            try:
                source = inspect.getsource(current)
            except (OSError, TypeError):
                source = None
            if source is not None and "dtype=torch.int16" not in source:
                raise RuntimeError(f"verl_agent_loop_routing_0_9: AgentLoopOutput.as_dict of verl {version} no "
                                   "longer converts routed_experts to int16; review this patch")
        elif not inspect.iscoroutinefunction(current):
            raise RuntimeError(f"verl_agent_loop_routing_0_9: {target[1]}.{target[2]} is not a coroutine")
        found[target] = (cls, current)
    for target, (cls, current) in found.items():
        _original[target] = current
        setattr(cls, target[2], _replacement(target, current))
    if found:
        logger.info("verl_agent_loop_routing_0_9: verl %s: routing checked in %s; for FSDP actors carried as uint8 "
                    "where it fits", version, ", ".join(f"{t[1]}.{t[2]}" for t in found))
    return bool(found)


def revert() -> bool:
    """Restore verl's functions. Idempotent."""
    if not _original:
        return False
    for target, cls in _targets(import_v1=False):
        current = cls.__dict__.get(target[2])
        if target in _original and getattr(current, "__wrapped__", None) is _original[target]:
            setattr(cls, target[2], _original[target])
    _original.clear()
    logger.info("verl_agent_loop_routing_0_9: restored AgentLoopOutput.as_dict and the agent loop workers' "
                "_agent_loop_postprocess")
    return True
