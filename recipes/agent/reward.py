"""Agent reward for verl: the final answer of a multi-turn conversation, checked like the math recipe's.

``solution_str`` is the whole response of the conversation (every assistant turn and the tool
responses between them); the answer is its last ``\\boxed{...}`` (else its last ``Answer:``),
which is the final turn's when the model finishes with one. Scoring, the returned fields and the
time limit are those of ``recipes/math/reward.py``, loaded from there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["compute_score"]

_spec = importlib.util.spec_from_file_location("verl_r3_recipe_math_reward",
                                               Path(__file__).resolve().parents[1] / "math" / "reward.py")
_math = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_math)


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict:
    """Score one conversation (verl's custom reward signature)."""
    return _math.compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
