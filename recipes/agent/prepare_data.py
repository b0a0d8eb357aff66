"""Multi-turn tool-use data in verl's parquet format: DATA_DIR/train.parquet and DATA_DIR/test.parquet.

    python recipes/agent/prepare_data.py --out ~/data/verl_r3/agent        # DAPO-Math-17k; AIME24/25, AMC23, MATH-500
    python recipes/agent/prepare_data.py --out DIR --train gsm8k --test gsm8k
    python recipes/agent/prepare_data.py --out DIR --smoke                  # offline: reasoning-gym, small

The problems and their sources are the math recipe's (``recipes/math/prepare_data.py``, the same
``--train`` / ``--test`` names). Each row adds a system message offering the ``python`` tool and
``agent_name = r3_tool_agent``, the agent loop verl runs for it (``r3_agent_loop.py``); the tool's
schema itself reaches the model through the chat template.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_spec = importlib.util.spec_from_file_location("verl_r3_recipe_math_data", HERE.parent / "math" / "prepare_data.py")
math_data = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(math_data)

AGENT_NAME = "r3_tool_agent"
SYSTEM = ("You can run Python programs with the python tool to calculate. When you know the answer, "
          "put it within \\boxed{}.")


def as_agent_row(row: dict) -> dict:
    """A math recipe row as a tool-use row: the system message first, verl's agent loop named."""
    return {**row, "prompt": [{"role": "system", "content": SYSTEM}, *row["prompt"]], "ability": "math_tool",
            "agent_name": AGENT_NAME}


def main(argv=None) -> int:
    """The math recipe's command line (same sources and options), writing agent rows."""
    return math_data.main(argv, as_row=as_agent_row, description=__doc__.split("\n\n")[0])

if __name__ == "__main__":
    sys.exit(main())
