"""The quickstart's report: ``verl_r3.report`` over its run directory, written into that directory.

A run directory holds one ``<variant>.jsonl`` per trained variant (verl's ``FileLogger``), a
``<variant>.meta.json`` beside each (group, variant, project, steps and wall time from the
runner) and the W&B offline runs under ``wandb/``; ``verl_r3.report`` reads the ``.jsonl`` files
and leaves out the W&B runs of the same runs. What is the quickstart's own: the title, and the
legend of the step-1 k3 KL, the column that compares variants on the same rollouts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from verl_r3 import report

__all__ = ["TITLE", "LEGEND", "summarize"]

TITLE = "Quickstart report"

LEGEND = {
    **report.LEGEND,
    "first_k3_kl": "**k3 KL, step 1**: the k3 KL of the first step. Every variant starts from the same weights, "
                   "prompts and seeds. With `ROLLOUT_ENGINE=hf` (requests seeded by prompt) they score the same "
                   "rollouts at step 1: the cleanest side-by-side figure. vLLM and SGLang sample from one "
                   "engine-wide stream, so with them the step-1 rollouts differ from variant to variant.",
}


def summarize(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Write summary.json, report.md and curves.png into ``run_dir``; return summary.json's mapping.

    Its keys are the variants (the ``.jsonl`` stems), its fields ``verl_r3.report.SUMMARY_FIELDS``.
    """
    return report.write_report([run_dir], run_dir, title=TITLE, legend=LEGEND).summary
