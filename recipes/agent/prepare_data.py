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

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from verl_rows import HubUnavailable, write_splits  # noqa: E402,F401 (HubUnavailable: for callers)

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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="DATA_DIR: train.parquet and test.parquet go here")
    p.add_argument("--train", default="dapo", help="comma-separated train sources (the math recipe's)")
    p.add_argument("--test", default="aime24,aime25,amc23,math500", help="comma-separated test sources")
    p.add_argument("--limit", type=int, default=None, help="at most this many rows per source")
    p.add_argument("--seed", type=int, default=0, help="for the generated source")
    p.add_argument("--smoke", action="store_true", help="offline and small: reasoning_gym, 64 train / 16 test")
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.test = "reasoning_gym", "reasoning_gym"

    def rows(name: str, split: str) -> list[dict]:
        limit = (16 if split == "test" else args.limit or 64) if args.smoke else args.limit
        return [as_agent_row(row) for row in math_data.rows_for(name, split, limit=limit, seed=args.seed,
                                                                 smoke=args.smoke)]

    return write_splits(args.out, {"train": args.train, "test": args.test}, rows)

if __name__ == "__main__":
    sys.exit(main())
