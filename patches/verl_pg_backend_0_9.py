"""Patch: verl's process-group backend string on the CPU platform (verl 0.9.x).

What it patches
    ``verl.utils.distributed.initialize_global_process_group`` and
    ``verl.utils.distributed.initialize_global_process_group_ray`` (verl 0.9.1,
    file ``verl/utils/distributed.py``), plus every already-imported ``verl.*`` module that
    bound those functions by name (``verl.workers.engine_workers``,
    ``verl.checkpoint_engine.base``), so that early ``from ... import`` bindings see the fix.

Why
    Both functions build the backend as ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``
    instead of asking the platform for it. With verl_r3's CPU platform that string becomes
    ``"cpu:gloo,cpu:gloo"``, which ``torch.distributed.init_process_group`` rejects (a device
    type may appear only once). On the CPU platform the backend must be plain ``"gloo"``.
    The replacements pick ``"gloo"`` when verl's device is ``"cpu"`` and otherwise build exactly
    the string verl builds, so applying the patch on an accelerator changes nothing. An
    explicit ``backend=`` argument (verl's checkpoint engine passes ``"cpu:gloo"``, which torch
    accepts) is passed through untouched.

Upstream reference
    verl 0.9.1, ``verl/utils/distributed.py``: ``initialize_global_process_group`` and
    ``initialize_global_process_group_ray``.

Versions tested
    verl 0.9.1 with torch 2.13.0 (CPU build).

Remove when
    verl asks the platform for the whole backend string (or drops the ``cpu:gloo,`` prefix when
    the device itself is the CPU), or ships a CPU platform of its own.

Applied by ``verl_r3.integration.cpu_platform.activate()``, never on import of this module.
"""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.9.0,<0.10.0"
_TARGET_MODULE = "verl.utils.distributed"
_TARGET_NAMES = ("initialize_global_process_group", "initialize_global_process_group_ray")

# name -> original function, filled by apply(); empty means "not applied".
_originals: dict[str, object] = {}


def installed_verl_version() -> str | None:
    """The installed verl distribution's version, or None when verl is not installed."""
    return installed_version("verl")


def check_version() -> str:
    """Return the installed verl version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "verl_pg_backend_0_9", "verl", installed_verl_version(), SUPPORTED,
        "check whether that verl still hard-codes 'cpu:gloo,<device>:<backend>' in verl/utils/distributed.py and "
        "add a patch module for its version window if it does",
    )


def default_backend() -> str:
    """The backend verl should pass to torch for the current verl platform."""
    from verl.utils.device import get_device_name, get_nccl_backend

    device = get_device_name()
    if device == "cpu":
        # gloo serves CPU tensors by itself; torch refuses the CPU device listed twice.
        return "gloo"
    return f"cpu:gloo,{device}:{get_nccl_backend()}"


def _initialize_global_process_group(timeout_second=36000):
    """verl's initialize_global_process_group with the backend taken from default_backend().

    Same contract as verl 0.9.1: init from the environment (torchrun-style variables or
    DIST_INIT_METHOD), select the local device, return (local_rank, rank, world_size).
    """
    import torch.distributed

    from verl.utils.device import get_torch_device

    torch.distributed.init_process_group(
        backend=default_backend(),
        timeout=timedelta(seconds=timeout_second),
        init_method=os.environ.get("DIST_INIT_METHOD", None),
    )
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.distributed.is_initialized():
        get_torch_device().set_device(local_rank)
    return local_rank, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _initialize_global_process_group_ray(timeout_second=None, backend=None):
    """verl's initialize_global_process_group_ray with a platform-correct default backend."""
    original = _originals.get("initialize_global_process_group_ray")
    if original is None:  # reverted while a caller still held this function
        import verl.utils.distributed as dist_module

        original = dist_module.initialize_global_process_group_ray
    # Only the default changes; the original keeps its own rank/world-size handling.
    return original(timeout_second=timeout_second, backend=backend or default_backend())


_REPLACEMENTS = {
    "initialize_global_process_group": _initialize_global_process_group,
    "initialize_global_process_group_ray": _initialize_global_process_group_ray,
}


def _rebind(current: dict, wanted: dict) -> list[str]:
    """In every loaded verl module, point each name bound to ``current[name]`` at ``wanted[name]``;
    returns the sorted "module.name" entries changed."""
    changed = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or not (mod_name == "verl" or mod_name.startswith("verl.")):
            continue
        for name in _TARGET_NAMES:
            if getattr(module, name, None) is current[name]:
                setattr(module, name, wanted[name])
                changed.append(f"{mod_name}.{name}")
    return sorted(changed)


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install the replacements. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    import verl.utils.distributed as dist_module

    for name in _TARGET_NAMES:
        _originals[name] = getattr(dist_module, name)
    # Rebind in the target module and in any verl module that already did
    # `from verl.utils.distributed import <name>`; later importers read the patched target.
    replaced = _rebind(_originals, _REPLACEMENTS)
    logger.info(
        "verl_pg_backend_0_9: verl %s: replaced %s (process-group backend 'gloo' on the CPU platform)",
        version,
        ", ".join(replaced),
    )
    return True


def revert() -> bool:
    """Restore the original functions in every verl module bound to a replacement. Idempotent."""
    if not _originals:
        return False
    # Scan every verl module: modules imported after apply() picked up the replacements
    # through `from verl.utils.distributed import ...` as well.
    restored = _rebind(_REPLACEMENTS, _originals)
    logger.info("verl_pg_backend_0_9: restored the originals in %s", ", ".join(restored))
    _originals.clear()
    return True
