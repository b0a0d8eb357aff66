"""Patch: the FSDP2 reference model's CPU offload without pinned memory on the CPU platform (verl 0.9.x).

What it patches
    The name ``CPUOffloadPolicy`` in ``verl.workers.engine.fsdp.transformer_impl`` (verl 0.9.1),
    the module global ``FSDPEngine._build_fsdp_module`` calls as ``CPUOffloadPolicy(pin_memory=True)``
    for every forward-only engine (verl's reference model) and for ``offload_policy=True``.

Why
    Pinning host memory needs an accelerator runtime: on a CPU-only machine FSDP2 fails with
    "Cannot access accelerator device when none is available" while building the reference
    model, so any run with a KL loss or KL reward stops before its first step. On the CPU
    platform the replacement builds torch's own ``CPUOffloadPolicy`` with ``pin_memory=False``
    (parameters already live in host memory; nothing else changes). On any other platform it
    builds exactly what verl asked for.

Upstream reference
    verl 0.9.1, ``verl/workers/engine/fsdp/transformer_impl.py``, ``FSDPEngine._build_fsdp_module``
    (``offload_policy = CPUOffloadPolicy(pin_memory=True)``).

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build).

Remove when
    verl asks the platform whether to pin memory, or ships a CPU platform of its own.

Applied by ``verl_r3.integration.fsdp_cpu.register_cpu_engines()``, never on import of this module.
"""

from __future__ import annotations

import logging

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
_TARGET_MODULE = "verl.workers.engine.fsdp.transformer_impl"
_NAME = "CPUOffloadPolicy"

_original: list = []  # [original class] while applied


def installed_verl_version() -> str | None:
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_fsdp2_offload_cpu_0_9", "verl", installed_verl_version(), SUPPORTED,
        f"check whether {_TARGET_MODULE} still builds CPUOffloadPolicy(pin_memory=True) and add a patch module "
        "for its version window if it does",
    )


def _offload_policy(*args, pin_memory: bool = True, **kwargs):
    """torch's CPUOffloadPolicy, unpinned on the CPU platform."""
    from verl.utils.device import get_device_name

    if get_device_name() == "cpu":
        pin_memory = False
    return _original[0](*args, pin_memory=pin_memory, **kwargs)


def is_applied() -> bool:
    return bool(_original)


def apply() -> bool:
    """Install the replacement. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    import importlib

    module = importlib.import_module(_TARGET_MODULE)
    current = getattr(module, _NAME, None)
    if current is None:
        raise RuntimeError(f"verl_fsdp2_offload_cpu_0_9: {_TARGET_MODULE}.{_NAME} is missing (torch without FSDP2?)")
    _original.append(current)
    setattr(module, _NAME, _offload_policy)
    logger.info("verl_fsdp2_offload_cpu_0_9: verl %s: %s.%s builds unpinned policies on the CPU platform",
                version, _TARGET_MODULE, _NAME)
    return True


def revert() -> bool:
    """Restore verl's binding. Idempotent."""
    if not _original:
        return False
    import importlib

    module = importlib.import_module(_TARGET_MODULE)
    if getattr(module, _NAME, None) is _offload_policy:
        setattr(module, _NAME, _original[0])
    _original.clear()
    logger.info("verl_fsdp2_offload_cpu_0_9: restored %s.%s", _TARGET_MODULE, _NAME)
    return True
