"""Patch: how verl 0.9.x loads its SGLang rollout replica, on the CPU platform.

What it patches
    The loader verl registers for the rollout name ``"sglang"``:
    ``verl.workers.rollout.replica.RolloutReplicaRegistry._registry["sglang"]`` (verl 0.9.1's
    ``_load_sglang``, file ``verl/workers/rollout/replica.py``). The replacement imports the
    same class, ``verl.workers.rollout.sglang_rollout.async_sglang_server.SGLangReplica``.

Why
    verl's loader sets ``SGLANG_USE_CPU_ENGINE=1`` while it imports SGLang (and, without vLLM,
    installs mock ``vllm`` modules for good). SGLang evaluates that switch at import time in
    module globals: with it, ``sglang.kernels.ops.kvcache.cache_move`` imports the CPU build of
    sgl-kernel, which is not on PyPI, and the import fails
    (``ModuleNotFoundError: No module named 'sgl_kernel'``), so no SGLang rollout can start on a
    host without an accelerator. verl_r3 runs SGLang's torch-native paths instead
    (``verl_r3.engines.sglang_engine``), which need the switch unset. The replacement imports
    the replica with ``SGLANG_USE_CPU_ENGINE`` absent and installs no mock modules (SGLang's
    scheduler gets its one vLLM stand-in from ``verl_r3.patches.sglang_cpu_0_5``, scoped to the
    rotary-embedding constructor).

Upstream reference
    verl 0.9.1, ``verl/workers/rollout/replica.py``: ``_load_sglang`` and
    ``RolloutReplicaRegistry.register("sglang", _load_sglang)``.

Versions tested
    verl 0.9.1 with sglang 0.5.23, torch 2.14.1 (CPU).

Remove when
    verl stops setting ``SGLANG_USE_CPU_ENGINE`` for the import (or asks the platform whether
    to), or SGLang's CPU engine kernels come from PyPI.

Apply only on verl_r3's CPU platform (``VERL_PLATFORM=cpu``), in every verl process that
resolves rollout replicas; never on import of this module.
"""

from __future__ import annotations

import logging
import os

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
NAME = "sglang"
_TARGET_MODULE = "verl.workers.rollout.replica"
_SWITCH = "SGLANG_USE_CPU_ENGINE"

_original: list = []  # [verl's loader] while applied


def installed_verl_version() -> str | None:
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_sglang_replica_cpu_0_9", "verl", installed_verl_version(), SUPPORTED,
        f"check whether {_TARGET_MODULE}'s loader for 'sglang' still sets {_SWITCH}=1 and add a patch module for "
        "its version window if it does",
    )


def load_sglang_replica():
    """The SGLang replica class, imported with ``SGLANG_USE_CPU_ENGINE`` absent."""
    saved = os.environ.pop(_SWITCH, None)
    try:
        from verl.workers.rollout.sglang_rollout.async_sglang_server import SGLangReplica
    finally:
        if saved is not None:
            os.environ[_SWITCH] = saved
    return SGLangReplica


def _registry() -> dict:
    import importlib

    registry = getattr(importlib.import_module(_TARGET_MODULE).RolloutReplicaRegistry, "_registry", None)
    if not isinstance(registry, dict):
        raise RuntimeError(f"verl_sglang_replica_cpu_0_9: {_TARGET_MODULE}.RolloutReplicaRegistry._registry is not a "
                           "dict; this patch targets the layout of verl 0.9.1")
    return registry


def is_applied() -> bool:
    return bool(_original)


def apply() -> bool:
    """Install the replacement loader. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    registry = _registry()
    if NAME not in registry:
        raise RuntimeError(f"verl_sglang_replica_cpu_0_9: verl {version} registers no rollout named {NAME!r}")
    _original.append(registry[NAME])
    registry[NAME] = load_sglang_replica
    logger.info("verl_sglang_replica_cpu_0_9: verl %s: rollout %r loads SGLangReplica without %s=1",
                version, NAME, _SWITCH)
    return True


def revert() -> bool:
    """Restore verl's loader. Idempotent."""
    if not _original:
        return False
    registry = _registry()
    if registry.get(NAME) is load_sglang_replica:
        registry[NAME] = _original[0]
    _original.clear()
    logger.info("verl_sglang_replica_cpu_0_9: restored verl's loader for rollout %r", NAME)
    return True
