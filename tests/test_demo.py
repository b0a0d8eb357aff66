"""The CPU demo behind `make quickstart` (quick mode)."""

from __future__ import annotations

import math

from verl_r3.demo import report, run


def test_quick_demo_replays_rollout_routing_and_keeps_router_gradients():
    result = run(quick=True, seed=0, log=lambda *a: None)
    assert math.isfinite(result["warm_start_loss"]) and result["warm_start_loss"] < 3.0  # it learned
    # bf16 inference and fp32 training pick different experts for some (token, layer) pairs.
    assert result["router_disagreement"]["router"] > 0
    stats = result["replay_stats"]
    assert stats["forwards"] == 1 and stats["fallback"] == 0
    assert stats["replayed"] == result["sequences"] * 128 * 4
    assert stats["disagree"] > 0
    # fp32 training is deterministic; the mismatch is inference vs training.
    assert result["forward_twice"]["k3_kl"] == 0.0
    assert result["no_replay"]["k3_kl"] > 0 and result["replay"]["k3_kl"] > 0
    assert result["no_replay"]["tokens"] == result["response_tokens"] == result["sequences"] * 112
    assert all(g > 0 for g in result["router_grad_abs_sum"])
    text = report(result)
    assert "R3 replay" in text and "router disagreement" in text
