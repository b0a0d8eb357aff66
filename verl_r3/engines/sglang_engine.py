"""SGLang with native routing capture, on any device, including a host without an accelerator.

Capture is SGLang's own: start the engine with ``enable_return_routed_experts=True`` and ask
for it per request with ``return_routed_experts=True``. Each output's
``meta_info["routed_experts"]`` is then base64 of ``[rows, L, K]`` (all decoder layers, logical
expert ids) covering positions ``[start, prompt + generated - 1)``, where ``start`` is the
request's ``routed_experts_start_len`` (default 0; SGLang accepts ``0 <= start <= prompt
tokens``). SGLang's own dtype is little-endian int32; with ``VERL_R3_SGLANG_COMPACT_ROUTING=1``
(``start_cpu_engine``'s default) the plugin below applies ``verl_r3.patches.sglang_compact_routing_0_5``
in SGLang's processes, which keep and send it as ``uint8`` (``int16`` above 255 experts). That is
exactly ``RoutingRecord`` with ``start = start``: ``routing_record`` converts either, telling the
width from the output's token counts. Multi-turn: send turn ``t`` with
``routed_experts_start_len`` = the length of the context the previous record already
covers (its ``end``, i.e. previous prompt + response - 1), then ``previous.stitch(new)``;
rows of a prefix served from SGLang's radix cache are still returned (SGLang keeps the
routing of cached tokens with their KV slots).

On a host without an accelerator SGLang runs with ``device="cpu"``, the torch-native
attention backend and no CUDA graphs (``cpu_engine_kwargs``), ``SGLANG_USE_CPU_ENGINE``
unset (that switch selects SGLang's own CPU engine, which needs a CPU build of sgl-kernel),
and the fixes of ``verl_r3.patches.sglang_cpu_0_5``. SGLang spawns its scheduler and
detokenizer, so those fixes reach them through SGLang's general-plugin entry point
(``sglang.srt.plugins``): ``scripts/sglang_env.sh`` registers ``sglang_plugin`` below, which
applies the patch in every SGLang process when ``VERL_R3_SGLANG_CPU=1``.
``start_cpu_engine`` sets that variable and checks the registration.

sglang is imported only inside functions: this module imports where SGLang is not installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

from verl_r3.core.formats import from_sglang, sglang_rows
from verl_r3.core.record import RoutingRecord

__all__ = [
    "COMPACT_FLAG",
    "CPU_FLAG",
    "PLUGIN_GROUP",
    "PLUGIN_NAME",
    "cpu_engine_kwargs",
    "compact_routing_patch",
    "cpu_patch",
    "plugin_registered",
    "prepare_verl_rollout_on_cpu",
    "routing_record",
    "sglang_plugin",
    "start_cpu_engine",
]

logger = logging.getLogger(__name__)

CPU_FLAG = "VERL_R3_SGLANG_CPU"
COMPACT_FLAG = "VERL_R3_SGLANG_COMPACT_ROUTING"
PLUGIN_GROUP = "sglang.srt.plugins"
PLUGIN_NAME = "verl_r3_cpu"
PLUGIN_TARGET = "verl_r3.engines.sglang_engine:sglang_plugin"


def cpu_patch():
    """The module ``verl_r3.patches.sglang_cpu_0_5``.

    An installed verl_r3 maps ``verl_r3.patches`` to the top-level ``patches/`` folder; in the
    SGLang environment, which runs verl_r3 from a checkout on ``PYTHONPATH``, a path finder
    written by ``scripts/sglang_env.sh`` does the same.
    """
    return importlib.import_module("verl_r3.patches.sglang_cpu_0_5")


def compact_routing_patch():
    """The module ``verl_r3.patches.sglang_compact_routing_0_5`` (see ``cpu_patch``)."""
    return importlib.import_module("verl_r3.patches.sglang_compact_routing_0_5")


def sglang_plugin() -> None:
    """SGLang general plugin (entry point ``sglang.srt.plugins``), run early in every SGLang
    process: applies ``sglang_cpu_0_5`` when ``VERL_R3_SGLANG_CPU=1`` and
    ``sglang_compact_routing_0_5`` when ``VERL_R3_SGLANG_COMPACT_ROUTING=1``; else does nothing."""
    if os.environ.get(CPU_FLAG) == "1":
        cpu_patch().apply()
    if os.environ.get(COMPACT_FLAG) == "1":
        compact_routing_patch().apply()


def prepare_verl_rollout_on_cpu() -> None:
    """What verl 0.9's own SGLang rollout (``actor_rollout_ref.rollout.name=sglang``) needs on
    verl_r3's CPU platform, applied in this verl process (call it in every one: driver, task
    runner, workers, the SGLang server actor; ``VERL_USE_EXTERNAL_MODULES`` does):

    * ``verl_sglang_replica_cpu_0_9``: verl imports its SGLang replica without
      ``SGLANG_USE_CPU_ENGINE=1`` (which needs the CPU build of sgl-kernel);
    * ``verl_sglang_server_0_9``: verl's server and weight sync against SGLang 0.5.23's
      interfaces, and the routing decoded into the tensor verl reads;
    * ``sglang_cpu_weight_sync_0_5``: weights handed to SGLang as CPU tensors.

    SGLang's own processes get ``sglang_cpu_0_5`` from the plugin, which needs
    ``VERL_R3_SGLANG_CPU=1`` in their environment: set it for the whole run. The rollout
    settings are verl's: ``engine_kwargs.sglang`` with ``device=cpu``,
    ``attention_backend=torch_native``, ``enable_memory_saver=False`` (and a
    ``max_total_tokens``), ``enforce_eager=True`` and ``free_cache_engine=False`` (SGLang's
    memory release synchronizes a CUDA device).
    """
    from verl_r3.patches import sglang_cpu_weight_sync_0_5, verl_sglang_replica_cpu_0_9, verl_sglang_server_0_9

    verl_sglang_replica_cpu_0_9.apply()
    verl_sglang_server_0_9.apply()
    sglang_cpu_weight_sync_0_5.apply()


def plugin_registered() -> bool:
    """True when this environment registers ``sglang_plugin`` with SGLang's plugin loader."""
    return any(ep.name == PLUGIN_NAME and ep.value == PLUGIN_TARGET
               for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP))


def cpu_engine_kwargs(model_path: str, *, dtype: str = "float32", capture: bool = True, **overrides) -> dict:
    """``sglang.Engine`` arguments for a host without an accelerator; ``overrides`` win."""
    kwargs = dict(
        model_path=model_path,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        dtype=dtype,
        enable_return_routed_experts=capture,
        log_level="warning",
    )
    kwargs.update(overrides)
    return kwargs


def start_cpu_engine(model_path: str, *, dtype: str = "float32", capture: bool = True, compact_routing: bool = True,
                     **overrides):
    """Start ``sglang.Engine`` on the CPU with the fixes of ``sglang_cpu_0_5`` in every SGLang process,
    and, with ``compact_routing`` (the default), ``sglang_compact_routing_0_5``: routing kept and
    returned one byte per id (two above 255 experts) instead of SGLang's four. ``routing_record``
    reads both.

    Raises RuntimeError when the environment cannot carry the fixes into SGLang's child
    processes (plugin not registered), or when ``SGLANG_USE_CPU_ENGINE=1`` is set.
    """
    if os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1":
        raise RuntimeError(
            "SGLANG_USE_CPU_ENGINE=1 selects SGLang's own CPU engine, which needs the CPU build of sgl-kernel; "
            "unset it to run SGLang's torch-native paths on the CPU"
        )
    if not plugin_registered():
        raise RuntimeError(
            f"no SGLang plugin {PLUGIN_NAME!r} -> {PLUGIN_TARGET} in entry-point group {PLUGIN_GROUP!r}: SGLang's "
            "scheduler and detokenizer processes would start without the CPU fixes. Use the environment built by "
            "scripts/sglang_env.sh (it registers the plugin), and keep the checkout on PYTHONPATH"
        )
    os.environ[CPU_FLAG] = "1"  # inherited by SGLang's children, whose plugin loader applies the patch
    os.environ[COMPACT_FLAG] = "1" if compact_routing else "0"
    cpu_patch().apply()
    import sglang

    return sglang.Engine(**cpu_engine_kwargs(model_path, dtype=dtype, capture=capture, **overrides))


def routing_record(meta_info: dict, *, num_layers: int, top_k: int, num_experts: int, start: int = 0,
                   sample: int | None = None) -> RoutingRecord:
    """The routing of one SGLang output (its ``meta_info``, whole) as a record covering ``[start, N - 1)``.

    ``start`` must be the ``routed_experts_start_len`` the request was sent with. The width of an
    id (SGLang's ``int32``, or one or two bytes with compact routing) follows from the output's
    ``prompt_tokens`` and ``completion_tokens``; a payload that fits neither raises ValueError.
    """
    routed = meta_info.get("routed_experts")
    who = f"sample {sample}: " if sample is not None else ""
    if routed is None:
        raise ValueError(
            f"{who}SGLang output has no routed_experts: start the engine with enable_return_routed_experts=True "
            "and pass return_routed_experts=True to generate"
        )
    return from_sglang(routed, num_layers=num_layers, top_k=top_k, num_experts=num_experts, start=start,
                       rows=sglang_rows(meta_info, start, who=who), sample=sample)
