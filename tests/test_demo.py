"""``verl_r3.demo.main``: the old ``verl-r3 demo`` entry point, now an alias of ``diagnose --demo``.

Runs the quick variant (short warm start, few prompts) in this process; the full demo and its
figures are covered by tests/test_diagnose.py.
"""

from __future__ import annotations

import argparse
import json

import pytest

from verl_r3 import demo


@pytest.mark.slow
def test_demo_alias_runs_the_diagnose_demo(tmp_path, capsys):
    assert demo.main(argparse.Namespace(quick=True, seed=0, out=str(tmp_path))) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    setup = metrics["setup"]
    assert setup["demo"] and setup["engine"] == "hf" and setup["prompts"] == demo.QUICK["num_prompts"]
    assert setup["warm_start"]["warm_start_steps"] == demo.QUICK["warm_start_steps"]
    # Replay uses the rollout's experts everywhere, and the routers still get gradients through it.
    assert metrics["replay"]["router_disagree"] == 0 and metrics["replay"]["fallback"] == 0
    assert metrics["router_grads_nonzero"] and len(metrics["router_grad_abs_sum"]) == setup["layers"]
    # fp32 training on a CPU is deterministic: two native passes agree exactly.
    assert metrics["forward_twice"]["k3_kl"] == 0 and metrics["forward_twice"]["router_disagree"] == 0
    printed = capsys.readouterr().out
    assert "no_replay" in printed and str(tmp_path / "metrics.json") in printed
