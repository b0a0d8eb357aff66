"""`scripts/quickstart.sh` (what `make quickstart` runs) end to end, short: 2 steps.

The run is a real `main_ppo` on vLLM's CPU build, the quickstart's default engine. To keep CI
short the warm start is cut and one of the five default variants runs: GSPO+R3, replay through the
script, its summary, report and curves. The other variants run elsewhere, through the same runner
or a recipe script: GRPO+R3 and R2 in tests/integration/test_main_ppo_cpu.py, plain GRPO in
tests/test_bench_memory_e2e.py, GRPO+TIS in the math recipe's smoke run
(tests/recipes/test_recipe_smoke.py). The summary of several variants is checked in
tests/quickstart/test_quickstart_parts.py; the full quickstart's figures are in the README.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ["gspo_r3"]


@pytest.mark.slow
def test_quickstart_script_writes_summary_report_and_curves(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, QUICK="1", WARM_START_STEPS="100", OUT=str(tmp_path / "runs"),
               WANDB_MODE="offline", VARIANTS=",".join(VARIANTS))
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "quickstart.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "STEPS=2" in proc.stdout  # the knobs are printed at start
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink()
    summary = json.loads((latest / "summary.json").read_text())
    assert sorted(summary) == sorted(VARIANTS)
    for variant, row in summary.items():
        assert row["steps"] == 2, (variant, row)
        for key in ("mean_k3_kl", "mean_extreme_frac_2", "mean_router_disagree", "mean_router_disagree_replayed",
                    "final_reward", "seconds_per_step"):
            assert row[key] is not None, (variant, key)
        # Every MoE layer of every response token used the rollout's experts.
        assert row["mean_replay_active_frac"] == 1.0, (variant, row)
        assert row["mean_router_disagree_replayed"] == 0.0, (variant, row)
    report = (latest / "report.md").read_text()
    assert all(f"| {v} " in report for v in VARIANTS), report
    assert (latest / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((latest / "wandb" / "wandb").glob("offline-run-*"))
