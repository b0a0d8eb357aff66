"""verl_r3: Rollout Routing Replay (R3) for Mixture-of-Experts RL with verl.

Public API::

    from verl_r3 import RouterReplay, RoutingRecord

Importing the package imports nothing heavy: the names above load torch and the core on first
use, so the command-line helpers that recipes and verl's processes call (``verl_r3.wandb_naming``,
``verl_r3.integration.cpu_settings``, ``verl-r3 --help``) start without it. The model-family
adapters (``verl_r3.families``) register on the first lookup of a family, whichever module of
the core it comes through.
"""

from __future__ import annotations

import importlib

from verl_r3 import core as _core

__all__ = ["MISSING", "RouterReplay", "RoutingRecord", "__version__"]
__version__ = "0.1.0"

if "verl_r3.families" not in _core.family_modules:
    _core.family_modules.append("verl_r3.families")

_LAZY = {"MISSING": "verl_r3.core.record", "RoutingRecord": "verl_r3.core.record",
         "RouterReplay": "verl_r3.core.replay"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'verl_r3' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
