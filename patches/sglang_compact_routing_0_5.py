"""Patch: SGLang 0.5.x keeps and sends routed expert ids one byte each (two above 255 experts).

What it patches (sglang 0.5.23, module ``sglang.srt.state_capturer.routed_experts``)
    1. ``RoutedExpertsCapturer.__init__``: the capturer's host buffer (``BaseHostCache``, one
       row per KV slot: ``[slots, layers, top_k]``) is allocated in ``sglang_compact_dtype(E)``
       of ``verl_r3.core.formats`` (``uint8`` up to 255 experts, ``int16`` up to 32767), where
       ``E`` comes from verl_r3's family of the model type (``routing_dims``). For a model type
       without a family, or more experts, the capturer is SGLang's own (``int32``), logged.
    2. ``RoutedExpertsCapturer._get_local_slice``: the step's ids, on their way from the device
       buffer to the host buffer, are clamped to ``[-1, E]`` and cast to that dtype on the
       device, before the copy to the host. An id outside ``[0, E)`` therefore arrives as one
       too (``E``, or -1, which is 255 in ``uint8``), and the reader's range check catches it.
    The device buffer the routers write during the forward (CUDA graphs included) is SGLang's,
    unchanged.

    Everything downstream is SGLang's own and carries whatever dtype the host buffer holds: each
    finished request's rows (``get_topk``), the output the scheduler sends to the tokenizer
    manager (or to the detokenizer), and the base64 string in ``meta_info["routed_experts"]``,
    which now holds 1 (or 2) bytes per id instead of 4. Readers tell the width from the output's
    token counts: ``verl_r3.core.formats.sglang_ids`` with ``rows=sglang_rows(meta_info)``, which
    verl_r3's SGLang readers (``routing_record``, verl's server with ``verl_sglang_server_0_9``) use.
    SGLang's own ``extract_routed_experts_from_meta_info`` reads ``int32`` only.

Why
    SGLang 0.5.23 keeps routing as ``int32`` from the routers to the output: the host buffer
    covers every KV slot of the pool (a Qwen3-30B-A3B engine with a million KV slots holds
    1.4 GiB of it), each finished request's rows are pickled to the tokenizer manager at four
    bytes per id, and base64 makes them 5.3 bytes there (46 and 61 MB for one 30k-token
    Qwen3-30B-A3B sample). Expert ids of up to 255 experts fit one byte.

Upstream reference
    sglang 0.5.23: ``python/sglang/srt/state_capturer/routed_experts.py``
    (``RoutedExpertsCapturer``), ``state_capturer/base.py`` (``BaseHostCache``,
    ``BaseTopkCapturer.on_forward_end``, ``get_topk``, ``TopkCaptureOutput.finalize``),
    ``managers/tokenizer_manager.py`` and ``managers/detokenizer_manager.py`` (the base64 encoding).

Versions tested
    sglang 0.5.23 with torch 2.14.1, on the CPU device.

Remove when
    SGLang keeps routing in a compact dtype itself.

Applied in every SGLang process by the SGLang plugin (``verl_r3.engines.sglang_engine:sglang_plugin``)
when ``VERL_R3_SGLANG_COMPACT_ROUTING=1``; verl's SGLang server sets it with
``verl_sglang_server_0_9`` and ``start_cpu_engine`` by default. Nothing is patched on import.
"""

from __future__ import annotations

import importlib
import logging

from verl_r3.patches._window import check_window, installed_version

logger = logging.getLogger(__name__)

NAME = "sglang_compact_routing_0_5"
SUPPORTED = ">=0.5.23,<0.6.0"
MODULE = "sglang.srt.state_capturer.routed_experts"
BASE_MODULE = "sglang.srt.state_capturer.base"
FLAG = "VERL_R3_SGLANG_COMPACT_ROUTING"

_originals: dict[str, object] = {}  # "init", "local_slice" -> SGLang's functions, while applied


def check_version() -> str:
    """Return the installed sglang version, or raise RuntimeError if it is outside the window."""
    return check_window(
        NAME, "sglang", installed_version("sglang"), SUPPORTED,
        f"check that sglang's {MODULE}.RoutedExpertsCapturer still allocates its host buffer through "
        f"{BASE_MODULE}.ALLOC_MEMORY_FUNCS and reads each step's ids through _get_local_slice, and add a patch "
        "module for its version window",
    )


def compact_ids(ids, num_experts: int, dtype):
    """``ids`` clamped to ``[-1, num_experts]`` and cast to ``dtype``, on their device: in range
    they are unchanged, outside they stay outside (see ``sglang_compact_dtype``)."""
    return ids.clamp(-1, num_experts).to(dtype)


def model_dtype(model_config) -> tuple:
    """``(dtype, E)`` for an SGLang ``ModelConfig``; ``(None, reason)`` to keep SGLang's ``int32``."""
    from verl_r3.core.formats import sglang_compact_dtype
    from verl_r3.core.replay import routing_dims

    config = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    try:
        experts = routing_dims(config)[2]
    except ValueError as exc:
        return None, str(exc)
    dtype = sglang_compact_dtype(experts)
    if dtype is None:
        return None, f"{experts} experts do not fit int16"
    return dtype, experts


class _AllocIn:
    """``ALLOC_MEMORY_FUNCS`` as ``BaseHostCache`` reads it, each allocator called with ``dtype`` instead."""

    def __init__(self, funcs, dtype) -> None:
        self._funcs, self._dtype = funcs, dtype

    def __getitem__(self, device):
        alloc = self._funcs[device]
        dtype = self._dtype

        def alloc_compact(*args, **kwargs):
            kwargs["dtype"] = dtype
            return alloc(*args, **kwargs)

        return alloc_compact


def _init(self, model_config, *args, **kwargs):
    dtype, experts = model_dtype(model_config)
    self._verl_r3_compact = None
    if dtype is None:
        logger.warning("%s: routing stays int32 in SGLang (%s)", NAME, experts)
        _originals["init"](self, model_config, *args, **kwargs)
        return
    base = importlib.import_module(BASE_MODULE)
    funcs = base.ALLOC_MEMORY_FUNCS
    base.ALLOC_MEMORY_FUNCS = _AllocIn(funcs, dtype)
    try:
        _originals["init"](self, model_config, *args, **kwargs)
    finally:
        base.ALLOC_MEMORY_FUNCS = funcs
    got = self.host_cache.buffer.dtype
    if got != dtype:
        raise RuntimeError(f"{NAME}: SGLang's routed-experts host buffer came out {got}, not {dtype}; this SGLang "
                           "allocates it another way than 0.5.23")
    self._verl_r3_compact = (dtype, experts)
    logger.info("%s: routed-experts host buffer %s in %s (%d experts), %.1f MB", NAME,
                tuple(self.host_cache.buffer.shape), dtype, experts,
                self.host_cache.buffer.numel() * self.host_cache.buffer.element_size() / 2**20)


def _get_local_slice(self, *args, **kwargs):
    ids = _originals["local_slice"](self, *args, **kwargs)
    compact = getattr(self, "_verl_r3_compact", None)
    if compact is None:
        return ids
    dtype, experts = compact
    return compact_ids(ids, experts, dtype)


def is_applied() -> bool:
    return bool(_originals)


def apply() -> bool:
    """Install both changes. Returns True if this call changed anything (idempotent)."""
    if _originals:
        return False
    version = check_version()
    module = importlib.import_module(MODULE)
    base = importlib.import_module(BASE_MODULE)
    cls = getattr(module, "RoutedExpertsCapturer", None)
    if (cls is None or "_get_local_slice" not in vars(cls) or "__init__" not in vars(cls)
            or not isinstance(getattr(base, "ALLOC_MEMORY_FUNCS", None), dict)):
        raise RuntimeError(f"{NAME}: sglang {version} has no {MODULE}.RoutedExpertsCapturer with its own __init__ "
                           f"and _get_local_slice, or no {BASE_MODULE}.ALLOC_MEMORY_FUNCS dict; this patch targets "
                           "the layout of sglang 0.5.23")
    _originals["init"], _originals["local_slice"] = cls.__init__, cls._get_local_slice
    cls.__init__, cls._get_local_slice = _init, _get_local_slice
    logger.info("%s: applied to sglang %s (routed experts kept and sent compact)", NAME, version)
    return True


def revert() -> bool:
    """Undo apply(). Returns True if this call changed anything (idempotent)."""
    if not _originals:
        return False
    cls = importlib.import_module(MODULE).RoutedExpertsCapturer
    cls.__init__, cls._get_local_slice = _originals["init"], _originals["local_slice"]
    _originals.clear()
    logger.info("%s: reverted", NAME)
    return True
