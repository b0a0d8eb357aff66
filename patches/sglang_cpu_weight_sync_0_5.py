"""Patch: SGLang 0.5.x's tensor hand-over for weight updates, with CPU tensors.

What it patches
    1. ``sglang.srt.utils.patch_torch._reduce_tensor_modified`` (the reducer that
       ``monkey_patch_torch_reductions()`` installs into ``torch.multiprocessing.reductions``):
       CPU tensors go to torch's own reducer; CUDA tensors keep SGLang's.
    2. torch's multiprocessing sharing strategy in this process: ``"file_system"``.

Why
    verl's SGLang rollout hands each weight bucket to SGLang's scheduler as tensors pickled with
    torch's multiprocessing reducers (``sglang.srt.weight_sync.utils.update_weights``), after
    SGLang's patch that swaps the CUDA device index for a device UUID in the reducer's output.
    That patch indexes an argument only CUDA tensors have, so on a host without an accelerator
    every update fails (``IndexError: tuple index out of range`` in ``_modify_tuple``). And a CPU
    tensor pickled under torch's default "file_descriptor" strategy can only be opened by a
    process that shares the sender's multiprocessing authentication key, which SGLang's
    scheduler (started by another process) does not; "file_system" names the shared-memory
    file instead. Apply in the processes that send weights (verl's workers).

Upstream reference
    sglang 0.5.23: ``python/sglang/srt/utils/patch_torch.py`` (``_reduce_tensor_modified``,
    ``_REDUCE_TENSOR_ARG_DEVICE_INDEX``), ``python/sglang/srt/weight_sync/utils.py``.

Versions tested
    sglang 0.5.23 with torch 2.14.1 on a host without GPU, inside verl 0.9.1's ``main_ppo``.

Remove when
    SGLang's reducer patch leaves non-CUDA tensors alone (or PyTorch's fix it works around,
    pytorch/pytorch#149248, lands and SGLang drops the patch).

Nothing is patched on import: call ``apply()`` (and ``revert()``).
"""

from __future__ import annotations

import importlib
import logging

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.5.23,<0.6.0"
_TARGET_MODULE = "sglang.srt.utils.patch_torch"
_NAME = "_reduce_tensor_modified"
STRATEGY = "file_system"

_originals: dict[str, object] = {}  # "reducer", "strategy" while applied


def check_version() -> str:
    """Return the installed sglang version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "sglang_cpu_weight_sync_0_5", "sglang", installed_version("sglang"), SUPPORTED,
        f"check whether that sglang's {_TARGET_MODULE}.{_NAME} still assumes CUDA tensors and add a patch module "
        "for its version window if it does",
    )


def _reduce_tensor(tensor, *args, **kwargs):
    """SGLang's reducer for CUDA tensors, torch's own for every other tensor."""
    if tensor.is_cuda:
        return _originals["reducer"](tensor, *args, **kwargs)
    from torch.multiprocessing import reductions

    original = getattr(reductions, "_reduce_tensor_original", reductions.reduce_tensor)
    return original(tensor, *args, **kwargs)


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install the reducer and the sharing strategy. Returns True if this call changed anything."""
    if _originals:
        return False
    version = check_version()
    import torch.multiprocessing

    module = importlib.import_module(_TARGET_MODULE)
    current = getattr(module, _NAME, None)
    if current is None:
        raise RuntimeError(f"sglang_cpu_weight_sync_0_5: sglang {version} has no {_TARGET_MODULE}.{_NAME}")
    _originals["reducer"] = current
    _originals["strategy"] = torch.multiprocessing.get_sharing_strategy()
    setattr(module, _NAME, _reduce_tensor)
    from torch.multiprocessing import reductions

    if getattr(reductions, "reduce_tensor", None) is current:  # SGLang's patch already installed: re-point it
        reductions.reduce_tensor = _reduce_tensor
        reductions.init_reductions()
    torch.multiprocessing.set_sharing_strategy(STRATEGY)
    logger.info("sglang_cpu_weight_sync_0_5: sglang %s: %s.%s passes CPU tensors to torch's reducer; sharing "
                "strategy %r (was %r)", version, _TARGET_MODULE, _NAME, STRATEGY, _originals["strategy"])
    return True


def revert() -> bool:
    """Restore SGLang's reducer and the previous sharing strategy. Idempotent."""
    if not _originals:
        return False
    import torch.multiprocessing
    from torch.multiprocessing import reductions

    module = importlib.import_module(_TARGET_MODULE)
    if getattr(module, _NAME, None) is _reduce_tensor:
        setattr(module, _NAME, _originals["reducer"])
    if getattr(reductions, "reduce_tensor", None) is _reduce_tensor:
        reductions.reduce_tensor = _originals["reducer"]
        reductions.init_reductions()
    torch.multiprocessing.set_sharing_strategy(_originals["strategy"])
    _originals.clear()
    logger.info("sglang_cpu_weight_sync_0_5: restored %s.%s and the sharing strategy", _TARGET_MODULE, _NAME)
    return True
