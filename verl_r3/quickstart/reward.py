"""Rule reward for the quickstart's arithmetic problems, in verl's custom reward signature.

verl's reward managers call ``compute_score(data_source=..., solution_str=..., ground_truth=...,
extra_info=..., **reward_kwargs)`` with the decoded response (special tokens skipped). Point
``reward.custom_reward_function.path`` at this file and ``.name`` at ``compute_score``.

The score is 1.0 when the first integer in the response equals the ground truth, else 0.0.
Empty, garbage or absurdly long responses score 0.0; this function never raises.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["first_integer", "compute_score"]

# An optional minus sign then up to 32 digits: longer runs are not answers to these problems and
# would only cost an int conversion.
_INT = re.compile(r"-?\d{1,32}")


def first_integer(text: Any) -> int | None:
    """The first integer written in ``text``, or None when there is none (or text is not a str)."""
    if not isinstance(text, str):
        return None
    match = _INT.search(text)
    return int(match.group()) if match else None


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> float:
    """1.0 when the first integer in ``solution_str`` equals ``ground_truth``, else 0.0."""
    predicted = first_integer(solution_str)
    try:
        expected = int(str(ground_truth).strip())
    except ValueError:
        return 0.0
    return 1.0 if predicted is not None and predicted == expected else 0.0
