"""Patch: run SGLang 0.5.x on a machine without an accelerator (device "cpu", torch kernels).

What it patches
    1. ``sglang.srt.layers.rotary_embedding.base.RotaryEmbedding.__init__``: while it runs, and
       only when no ``vllm`` package is installed, ``vllm`` and ``vllm._custom_ops`` resolve to
       a stand-in module whose ``rotary_embedding`` raises if it is ever called. The stand-in is
       removed from ``sys.modules`` as soon as the constructor returns, so no other code ever
       sees a ``vllm`` package (SGLang's fused-MoE module, for one, switches kernels when
       ``from vllm import _custom_ops`` succeeds).
    2. ``sglang.srt.mem_cache.pool_host.common.ALLOC_MEMORY_FUNCS`` (a defaultdict keyed by
       device type, shared by every module that imported it): a ``"cpu"`` entry that
       allocates unpinned host memory through the allocator SGLang passes.
    3. ``sglang.srt.models.deepseek_common.attention_backend_handler.AttentionBackendRegistry``:
       a handler for ``"torch_native"`` that runs every forward of a multi-head latent attention
       layer (DeepSeek-V2/V3 and the models built on SGLang's ``deepseek_v2``) in the absorbed
       form, ``AttnForwardMethod.MLA``. Only when SGLang registers no handler of its own for it.

Why
    With ``device="cpu"`` and ``SGLANG_USE_CPU_ENGINE`` unset (SGLang's own CPU engine needs
    the CPU build of sgl-kernel, which is not on PyPI), SGLang runs its torch-native paths:
    ``attention_backend="torch_native"`` and the native rotary embedding. Two things still
    fail:
    1. ``RotaryEmbedding.__init__`` picks the "fallback kernel" for any platform that is not
       CUDA, HIP, CPU-engine, XPU, NPU, MUSA or MPS and imports it with
       ``from vllm._custom_ops import rotary_embedding``. On a CPU device the op dispatches to
       ``forward_native`` and that kernel is never called, but the import fails without vLLM
       (``ModuleNotFoundError: No module named 'vllm'``) and kills the scheduler.
    2. The host buffer of the routed-experts capturer
       (``sglang.srt.state_capturer.base.BaseHostCache``) and the HiCache host pools allocate
       through ``ALLOC_MEMORY_FUNCS[device]``; ``"cpu"`` has no entry, so the default
       ``alloc_with_host_register`` pins the buffer with ``cudaHostRegister``, which fails
       without CUDA. Pinning buys nothing when the device is the host itself.
    3. A multi-head latent attention layer asks the registry how to run each forward; with no
       ``"torch_native"`` entry it gets the Triton handler, which picks plain multi-head
       attention for a prefill without cached prefix. That path hands the torch-native backend
       the latent KV cache (``kv_lora_rank + qk_rope_head_dim`` wide, one head) as if it held
       per-head keys, and the first prefill of a DeepSeek-V3 model kills the scheduler
       (``RuntimeError: Expected size for first two dimensions of batch2 tensor``). The absorbed
       form reads that cache as it is laid out, in prefill and decode alike.
    The fixes must hold in SGLang's child processes (scheduler, detokenizer). SGLang runs its
    general plugins (entry-point group ``sglang.srt.plugins``) early in each of them;
    ``scripts/sglang_env.sh`` registers ``verl_r3.engines.sglang_engine:sglang_plugin`` there,
    which calls ``apply()`` when ``VERL_R3_SGLANG_CPU=1``.

Upstream reference
    sglang 0.5.23: ``python/sglang/srt/layers/rotary_embedding/base.py``
    (``RotaryEmbedding.__init__``, the ``else: from vllm._custom_ops import rotary_embedding``
    branch), ``python/sglang/srt/mem_cache/pool_host/common.py`` (``ALLOC_MEMORY_FUNCS``),
    ``python/sglang/srt/models/deepseek_common/attention_backend_handler.py``
    (``handle_attention_triton``) and ``python/sglang/srt/layers/attention/torch_native_backend.py``
    (``forward_extend``).

Versions tested
    sglang 0.5.23 with torch 2.14.1 and transformers 5.19.0, on an x86_64 host without GPU.

Remove when
    SGLang gives the plain CPU device a native rotary path without the vLLM import (or makes the
    import lazy), an ``ALLOC_MEMORY_FUNCS`` entry for ``"cpu"`` and an attention handler for
    ``"torch_native"`` (3. already steps aside for one).

Nothing is patched on import: call ``apply()`` (and ``revert()``).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import types
from contextlib import contextmanager

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

SUPPORTED = ">=0.5.23,<0.6.0"
ROTARY_MODULE = "sglang.srt.layers.rotary_embedding.base"
ALLOC_MODULE = "sglang.srt.mem_cache.pool_host.common"
MLA_MODULE = "sglang.srt.models.deepseek_common.attention_backend_handler"
MLA_BACKEND = "torch_native"
STAND_IN_MARK = "__verl_r3_stand_in__"

# What apply() changed, for revert(): "rotary_init" -> original __init__, "alloc_cpu" -> True
# when the "cpu" entry is ours, "mla_handler" -> True when the "torch_native" handler is ours.
# Empty means "not applied".
_originals: dict[str, object] = {}


def check_version() -> str:
    """Return the installed sglang version, or raise RuntimeError if it is outside the window."""
    return check_window(
        "sglang_cpu_0_5", "sglang", installed_version("sglang"), SUPPORTED,
        f"check whether that sglang still imports vllm._custom_ops in {ROTARY_MODULE} and lacks a 'cpu' entry in "
        f"{ALLOC_MODULE}.ALLOC_MEMORY_FUNCS, and add a patch module for its version window if it does",
    )


def vllm_installed() -> bool:
    """True when a real ``vllm`` package can be imported (then no stand-in is ever used)."""
    module = sys.modules.get("vllm")
    if module is not None:
        return not getattr(module, STAND_IN_MARK, False)
    return importlib.util.find_spec("vllm") is not None


def _rotary_embedding_not_available(*args, **kwargs):
    raise RuntimeError(
        "vllm._custom_ops.rotary_embedding was called, but vLLM is not installed and verl_r3's "
        "sglang_cpu_0_5 patch only provides a stand-in for SGLang's import of it on the CPU device, "
        "where the rotary embedding dispatches to forward_native; this SGLang build took another path"
    )


@contextmanager
def vllm_custom_ops_stand_in():
    """Make ``from vllm._custom_ops import rotary_embedding`` resolve inside the block when
    vLLM is not installed; leaves ``sys.modules`` as it was afterwards. No-op with a real vLLM."""
    if vllm_installed():
        yield
        return
    package = types.ModuleType("vllm", "verl_r3 stand-in for SGLang's CPU rotary-embedding import")
    package.__path__ = []
    ops = types.ModuleType("vllm._custom_ops", "verl_r3 stand-in: rotary_embedding raises if called")
    ops.rotary_embedding = _rotary_embedding_not_available
    for module in (package, ops):
        setattr(module, STAND_IN_MARK, True)
    package._custom_ops = ops
    sys.modules["vllm"], sys.modules["vllm._custom_ops"] = package, ops
    try:
        yield
    finally:
        for name, module in (("vllm", package), ("vllm._custom_ops", ops)):
            if sys.modules.get(name) is module:
                del sys.modules[name]


def alloc_host_unpinned(dims, dtype, device, pin_memory, allocator, registration_granularity_bytes=None):
    """``ALLOC_MEMORY_FUNCS["cpu"]``: the same signature as SGLang's allocators; allocates with
    ``allocator`` (SGLang's host allocators, e.g. mmap-backed) and never pins."""
    if allocator is not None:
        return allocator.allocate(dims, dtype=dtype, device=device)
    import torch

    return torch.empty(dims, dtype=dtype, device=device)


def absorbed_mla_on_torch_native(attn, forward_batch):
    """The ``"torch_native"`` entry of SGLang's MLA handler registry: every forward of a latent
    attention layer in the absorbed form, the one that reads SGLang's latent KV cache as laid out."""
    return sys.modules[MLA_MODULE].AttnForwardMethod.MLA


def _patched_rotary_init(self, *args, **kwargs):
    original = _originals.get("rotary_init")
    if original is None:  # reverted while a class still held this function
        original = sys.modules[ROTARY_MODULE].RotaryEmbedding.__init__
    with vllm_custom_ops_stand_in():
        original(self, *args, **kwargs)


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install the three fixes. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    import importlib

    rotary = importlib.import_module(ROTARY_MODULE)
    alloc = importlib.import_module(ALLOC_MODULE)
    mla = importlib.import_module(MLA_MODULE)
    funcs = getattr(alloc, "ALLOC_MEMORY_FUNCS", None)
    registry = getattr(getattr(mla, "AttentionBackendRegistry", None), "_handlers", None)
    if (not isinstance(funcs, dict) or not hasattr(rotary, "RotaryEmbedding") or not isinstance(registry, dict)
            or not hasattr(getattr(mla, "AttnForwardMethod", None), "MLA")):
        raise RuntimeError(
            f"sglang_cpu_0_5: sglang {version} has no {ALLOC_MODULE}.ALLOC_MEMORY_FUNCS dict, no "
            f"{ROTARY_MODULE}.RotaryEmbedding, or no {MLA_MODULE}.AttentionBackendRegistry._handlers dict and "
            "AttnForwardMethod.MLA; this patch targets the layout of sglang 0.5.23"
        )
    changed = []
    _originals["rotary_init"] = rotary.RotaryEmbedding.__init__
    rotary.RotaryEmbedding.__init__ = _patched_rotary_init
    changed.append(
        f"{ROTARY_MODULE}.RotaryEmbedding.__init__ (vllm._custom_ops stand-in while it runs"
        + ("; inactive: vllm is installed)" if vllm_installed() else ")")
    )
    if "cpu" in funcs:  # a later SGLang may bring its own entry: keep it
        _originals["alloc_cpu"] = False
    else:
        funcs["cpu"] = alloc_host_unpinned
        _originals["alloc_cpu"] = True
        changed.append(f"{ALLOC_MODULE}.ALLOC_MEMORY_FUNCS['cpu'] (unpinned host memory)")
    if MLA_BACKEND in registry:  # a later SGLang may bring its own handler: keep it
        _originals["mla_handler"] = False
    else:
        registry[MLA_BACKEND] = absorbed_mla_on_torch_native
        _originals["mla_handler"] = True
        changed.append(f"{MLA_MODULE}.AttentionBackendRegistry['{MLA_BACKEND}'] (absorbed MLA)")
    logger.info("sglang_cpu_0_5: sglang %s: patched %s", version, "; ".join(changed))
    return True


def revert() -> bool:
    """Restore the original constructor and drop the ``"cpu"`` entry and ``"torch_native"`` handler
    apply() added. Idempotent."""
    if not _originals:
        return False
    rotary, alloc, mla = sys.modules[ROTARY_MODULE], sys.modules[ALLOC_MODULE], sys.modules[MLA_MODULE]
    if rotary.RotaryEmbedding.__init__ is _patched_rotary_init:
        rotary.RotaryEmbedding.__init__ = _originals["rotary_init"]
    if _originals["alloc_cpu"] and alloc.ALLOC_MEMORY_FUNCS.get("cpu") is alloc_host_unpinned:
        del alloc.ALLOC_MEMORY_FUNCS["cpu"]
    handlers = mla.AttentionBackendRegistry._handlers
    if _originals["mla_handler"] and handlers.get(MLA_BACKEND) is absorbed_mla_on_torch_native:
        del handlers[MLA_BACKEND]
    _originals.clear()
    logger.info("sglang_cpu_0_5: restored %s.RotaryEmbedding.__init__, %s.ALLOC_MEMORY_FUNCS and %s's handlers",
                ROTARY_MODULE, ALLOC_MODULE, MLA_MODULE)
    return True
