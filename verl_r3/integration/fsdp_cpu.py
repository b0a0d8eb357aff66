"""verl's own FSDP engines, made selectable on the CPU platform (verl 0.9.x).

verl registers ``FSDPEngineWithLMHead`` (``language_model``) and ``FSDPEngineWithValueHead``
(``value_model``) with ``EngineRegistry`` for the devices ``"cuda"`` and ``"npu"`` only.
``EngineRegistry.get_engine_cls`` looks engines up by ``get_device_name()``, which is
``"cpu"`` under ``verl_r3.integration.cpu_platform``, so on that platform verl's
``TrainingWorker`` finds no engine and fails with "No engine registered for device='cpu'".

``register_cpu_engines()`` registers verl's engine classes themselves (not copies, not
subclasses) for device ``"cpu"`` and the backends ``fsdp`` and ``fsdp2`` through the public
``EngineRegistry.register`` decorator. Nothing of verl is patched: the registration only adds
keys to the registry. It is idempotent (the registry asserts on a duplicate key, so keys
already present are skipped).

What runs on the CPU (checked by tests/integration/test_fsdp_engine_cpu.py): ``strategy=
"fsdp2"`` builds, computes log-probs and trains through verl's unmodified code with these
engine settings, which are configuration, not code changes:

- ``mixed_precision`` with ``param_dtype`` fp32 (or bf16; verl's default is bf16 autocast),
- ``offload_policy=True`` and ``forward_only=True`` (verl's reference model) turn on
  ``CPUOffloadPolicy(pin_memory=True)``, and pinning host memory needs an accelerator runtime:
  ``register_cpu_engines`` applies ``verl_r3.patches.verl_fsdp2_offload_cpu_0_9``, which
  builds that policy unpinned on the CPU platform,
- the model config's ``override_config={"attn_implementation": "eager"}`` (or ``"sdpa"``):
  verl's default is ``flash_attention_2``. With ``use_remove_padding`` verl packs a
  micro-batch into one row with ``attention_mask=None``; transformers then derives the
  block-diagonal (per-sequence) causal mask from the restarting ``position_ids``.

``strategy="fsdp"`` (FSDP1) is registered as well because verl registers both names for one
class, but FSDP1 does not run on the CPU (``sync_module_states`` needs accelerator
parameters); choose ``fsdp2``.
"""

from __future__ import annotations

import threading

__all__ = ["CPU_DEVICE", "BACKENDS", "ENGINE_MODULE", "register_cpu_engines", "registered"]

CPU_DEVICE = "cpu"
#: The verl module that defines (and registers) the FSDP engines.
ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
BACKENDS = ("fsdp", "fsdp2")

_lock = threading.Lock()


def _engine_classes() -> dict:
    """model_type -> verl's engine class, as verl registers them for cuda/npu."""
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    return {"language_model": FSDPEngineWithLMHead, "value_model": FSDPEngineWithValueHead}


def registered() -> dict:
    """{(model_type, backend): class} of the engines EngineRegistry holds for device "cpu"."""
    from verl.workers.engine.base import EngineRegistry

    out = {}
    for model_type, by_backend in EngineRegistry._engines.items():
        for backend, by_device in by_backend.items():
            if CPU_DEVICE in by_device:
                out[(model_type, backend)] = by_device[CPU_DEVICE]
    return out


def register_cpu_engines() -> dict:
    """Register verl's FSDP engines for device "cpu" (backends fsdp, fsdp2). Idempotent.

    Returns ``registered()`` after the registration. A key that already holds a different
    class (someone registered their own CPU engine first) is left alone: the registry
    refuses to overwrite, and so do we.
    """
    from verl.workers.engine.base import EngineRegistry

    from verl_r3.patches import verl_fsdp2_offload_cpu_0_9

    with _lock:
        verl_fsdp2_offload_cpu_0_9.apply()
        present = registered()
        for model_type, engine_cls in _engine_classes().items():
            backends = [b for b in BACKENDS if (model_type, b) not in present]
            if backends:
                EngineRegistry.register(model_type=model_type, backend=backends, device=CPU_DEVICE)(engine_cls)
        return registered()
