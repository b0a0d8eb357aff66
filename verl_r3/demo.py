"""``verl-r3 demo``: an alias of ``verl-r3 diagnose --demo`` (``verl_r3.diagnose``).

The teacher-forced demo that lived here became the diagnose demo, which samples real rollouts
with routing capture instead; this module keeps ``verl_r3.demo.main(args)`` working for its
callers. ``args`` may carry ``seed``, ``out`` (default ``runs/diagnose-demo``) and ``quick``
(a shorter warm start and fewer prompts: a smoke run, too small to show the mismatch well).
"""

from __future__ import annotations

import argparse

__all__ = ["QUICK", "main"]

QUICK = dict(warm_start_steps=200, num_prompts=32)


def main(args: argparse.Namespace | None = None) -> int:
    from verl_r3 import diagnose

    parser = argparse.ArgumentParser()
    diagnose.add_arguments(parser)
    options = parser.parse_args(["--demo"])
    options.seed = int(getattr(args, "seed", 0) or 0)
    options.out = getattr(args, "out", None)
    if getattr(args, "quick", False):
        options.warm_start_steps, options.num_prompts = QUICK["warm_start_steps"], QUICK["num_prompts"]
    return diagnose.main(options)
