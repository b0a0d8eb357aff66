"""A verl platform for CPU-only machines (verl 0.9.x).

Activate it in the environment of the process that imports verl (Ray workers inherit it)::

    export VERL_USE_EXTERNAL_MODULES=verl_r3.integration.cpu_platform
    export VERL_PLATFORM=cpu

verl imports every module listed in VERL_USE_EXTERNAL_MODULES during ``import verl`` in every
process, so importing this module registers the platform class under the name ``"cpu"`` with
``verl.plugin.platform.PlatformRegistry``. Registration alone changes nothing: the platform
never claims auto-detection (``is_platform_available`` is False), so on a GPU or NPU machine
verl keeps its own detection unless ``VERL_PLATFORM=cpu`` is set.

When ``VERL_PLATFORM=cpu`` is set at import time (or ``activate()`` is called):

- ``get_device_name()`` is ``"cpu"``, ``get_nccl_backend()`` is ``"gloo"``, ``get_device_id()``
  is ``"cpu"`` (a string, because verl passes it to ``Tensor.to``; an int would mean CUDA).
- ``get_torch_device()`` returns ``DEVICE_MODULE``: ``torch.cpu`` plus everything verl 0.9.1
  calls on the device module that ``torch.cpu`` lacks (memory counters report 0 because the CPU
  allocator keeps none, ``mem_get_info`` reports the host's available and total memory, RNG
  state is the CPU generator's, cache/IPC/allocator calls are no-ops).
- Ray placement asks for the logical resource ``"GPU"`` (start Ray with ``num_gpus``), so
  verl's resource-pool code runs unchanged; Ray then sets ``CUDA_VISIBLE_DEVICES``, which is
  the variable this platform reports and verl's workers read.
- The patch ``verl_r3.patches.verl_pg_backend_0_9`` is applied: verl hard-codes the
  process-group backend ``"cpu:gloo,<device>:<backend>"``, which torch rejects as
  ``"cpu:gloo,cpu:gloo"``; it becomes ``"gloo"``.
"""

from __future__ import annotations

import logging
import os
import pickle
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

logger = logging.getLogger(__name__)

PLATFORM_NAME = "cpu"
# The device string verl's flops table (verl/utils/flops_counter.py) knows the CPU by.
_DEVICE_DISPLAY_NAME = "CPU"


def is_selected() -> bool:
    """True when the environment asks verl for this platform."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME


def host_memory() -> tuple[int, int]:
    """(available, total) host memory in bytes: the CPU's answer to cuda.mem_get_info."""
    try:
        import psutil  # a Ray dependency, so present wherever verl runs

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    except ImportError:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


# ---------------------------------------------------------------------------------------------
# The device module: what verl calls on get_torch_device(), answered for the CPU.
# ---------------------------------------------------------------------------------------------


def _zero(device: Any = None) -> int:
    # The CPU allocator keeps no per-device accounting, so "bytes held by the caching
    # allocator" is truthfully 0 (verl's own performance.py reports 0 for torch.cpu too).
    return 0


def _nothing(*args: Any, **kwargs: Any) -> None:
    # Caches, IPC handles, memory fractions and device selection do not exist on the CPU.
    return None


def _get_rng_state(device: Any = None) -> torch.Tensor:
    # The CPU has one generator; verl saves and restores it as the "device" RNG state.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = None) -> None:
    torch.set_rng_state(new_state)


def _device_properties(device: Any = None) -> types.SimpleNamespace:
    # verl reads total_memory (memory_utils.get_memory_info); name for logs.
    return types.SimpleNamespace(
        name=_DEVICE_DISPLAY_NAME,
        total_memory=host_memory()[1],
        multi_processor_count=os.cpu_count() or 1,
    )


def _empty_snapshot() -> dict:
    return {"segments": [], "device_traces": []}


def _record_memory_history(*args: Any, **kwargs: Any) -> None:
    # verl's memory profiler (utils/memory_utils.py) turns CUDA allocator tracing on and off;
    # there is no CPU allocator trace, so say so once instead of failing the run.
    if not getattr(_record_memory_history, "_warned", False):
        logger.warning("cpu platform: device memory history is not recorded on the CPU; snapshots are empty")
        _record_memory_history._warned = True


def _dump_snapshot(filename: str = "dump_snapshot.pickle") -> None:
    # Same file format as torch.cuda.memory._dump_snapshot (a pickled dict), empty.
    with open(filename, "wb") as f:
        pickle.dump(_empty_snapshot(), f)


def _build_memory_namespace() -> types.ModuleType:
    memory = types.ModuleType(f"{__name__}.device.memory", "torch.cuda.memory stand-ins verl uses, for the CPU.")
    memory._record_memory_history = _record_memory_history
    memory._snapshot = lambda *a, **k: _empty_snapshot()
    memory._dump_snapshot = _dump_snapshot
    memory._set_allocator_settings = _nothing
    return memory


def _build_device_module() -> types.ModuleType:
    module = types.ModuleType(
        f"{__name__}.device",
        "torch.cpu extended with the torch.cuda-style calls verl 0.9.1 makes on get_torch_device().",
    )
    answers = {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        # A string on purpose: verl does tensor.to(get_torch_device().current_device()).
        "current_device": lambda: "cpu",
        "set_device": _nothing,
        "synchronize": _nothing,
        "empty_cache": _nothing,
        "ipc_collect": _nothing,
        "set_per_process_memory_fraction": _nothing,
        "reset_peak_memory_stats": _nothing,
        "reset_accumulated_memory_stats": _nothing,
        "reset_max_memory_allocated": _nothing,
        "memory_allocated": _zero,
        "memory_reserved": _zero,
        "max_memory_allocated": _zero,
        "max_memory_reserved": _zero,
        "memory_stats": lambda device=None: {},
        "mem_get_info": lambda device=None: host_memory(),
        "get_device_name": lambda device=None: _DEVICE_DISPLAY_NAME,
        "get_device_properties": _device_properties,
        "get_rng_state": _get_rng_state,
        "set_rng_state": _set_rng_state,
        "get_rng_state_all": lambda: [torch.get_rng_state()],
        "set_rng_state_all": lambda states: torch.set_rng_state(states[0]),
        "manual_seed": lambda seed: torch.manual_seed(seed),
        "manual_seed_all": lambda seed: torch.manual_seed(seed),
        "seed": lambda: torch.seed(),
        "initial_seed": lambda: torch.initial_seed(),
        "memory": _build_memory_namespace(),
    }
    for name, value in answers.items():
        setattr(module, name, value)

    def __getattr__(name: str) -> Any:
        # Streams, events and anything else torch.cpu already provides (PEP 562 fallback).
        try:
            return getattr(torch.cpu, name)
        except AttributeError:
            raise AttributeError(
                f"verl called get_torch_device().{name}, which neither torch.cpu nor verl_r3's CPU "
                f"platform provides; add it to {__name__}._build_device_module"
            ) from None

    module.__getattr__ = __getattr__
    return module


DEVICE_MODULE = _build_device_module()


# ---------------------------------------------------------------------------------------------
# The platform.
# ---------------------------------------------------------------------------------------------


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform whose device is the host CPU and whose collective backend is gloo."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never win auto-detection: a CPU is present everywhere, and claiming it would move a
        # GPU-less driver process (or a host whose accelerator probe fails) off verl's own
        # fallback. The platform is chosen only by VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # verl uses get_device_id() as a device argument (tensor.to(...), device=...);
        # 0 would mean cuda:0, so answer the CPU's own device string as torch.cpu does.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None  # CPU kernels complete before they return

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        # verl sets CUDA allocator options (expandable_segments); the CPU allocator has none.
        logger.debug("cpu platform: ignoring allocator settings %r", settings)

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray assigns the logical GPUs this platform asks for through CUDA_VISIBLE_DEVICES,
        # and verl's Worker derives its local rank from that variable.
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

    def is_ipc_supported(self) -> bool:
        return False  # no CUDA IPC handles; verl falls back to shared memory

    @contextmanager
    def nvtx_range(self, msg: str):
        # The CPU analogue of an NVTX range: a named range in torch.profiler traces.
        with torch.profiler.record_function(msg):
            yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def cudart(self) -> Any:
        return None


def activate() -> None:
    """Apply what the CPU platform needs beyond the registration. Idempotent.

    Called on import when VERL_PLATFORM=cpu; call it yourself if you select the platform by
    other means (``verl.plugin.platform.set_platform(PlatformCPU())``).
    """
    from verl_r3.patches import verl_pg_backend_0_9

    verl_pg_backend_0_9.apply()


if is_selected():
    activate()
