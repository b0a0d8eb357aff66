"""verl_r3: Rollout Routing Replay (R3) for Mixture-of-Experts RL with verl.

Public API::

    from verl_r3 import RouterReplay, RoutingRecord
"""

from verl_r3.core.record import MISSING, RoutingRecord
from verl_r3.core.replay import RouterReplay
from verl_r3 import families as _families  # noqa: F401  (registers the model families)

__all__ = ["MISSING", "RouterReplay", "RoutingRecord", "__version__"]
__version__ = "0.1.0"
