"""verl's own trainer (``python -m verl.trainer.main_ppo``) end to end on CPU with verl_r3.

Each case is a real run: Ray, TransferQueue, the FSDP2 actor (``FSDPReplayEngine``), a bf16
rollout against the fp32 trainer (verl's own vLLM server on vLLM's CPU build with the capture
patch, or verl_r3's ``hf`` engine), verl's reward loop and W&B offline, 2 steps on a tiny
Qwen3-MoE, under a wall-clock limit (the process group is killed on timeout). R3 on the ``hf``
engine runs end to end in tests/reliability/test_faults.py (a run resumed from a checkpoint), the
variants without replay (bf16 rollout and fp32 trainer disagreeing on routing) in
tests/quickstart/test_quickstart_run.py. R3 without rollout routing is refused by the engine
(tests/integration/test_fsdp_replay.py), and such a refusal ending a real run at its first step
is tested in tests/reliability/test_faults.py. What is checked comes from the metrics verl itself
logged (verl's file logger).
"""

from __future__ import annotations

import glob
import json
import os
import re

import pytest

pytest.importorskip("verl")

from cpu_verl import ppo_inputs  # noqa: E402

from verl_r3.quickstart.runner import RunSpec, run_variant  # noqa: E402

TIMEOUT_S = 420

# Varies from sample to sample even for an untrained model, so GRPO advantages (and the
# gradient) are not all zero.
_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    text = solution_str or ""
    return len(set(text)) / (1.0 + len(text))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ppo_inputs(tmp_path_factory.mktemp("main_ppo"), _REWARD)


def _run(setup, variant: str, name: str, extra=(), engine: str = "vllm") -> dict:
    root, model_dir, train, val, reward = setup
    spec = RunSpec(model=model_dir, train_file=train, val_file=val, reward_file=reward, out_dir=str(root / name),
                   steps=2, prompts=4, n=2, response_length=8, group=name, rollout_engine=engine)
    return run_variant(variant, spec, timeout_s=TIMEOUT_S, extra=list(extra))


def _ids_per_token(setup) -> int:
    """Expert ids per token of the model: layers x top-k."""
    config = json.loads((setup[0] / "model" / "config.json").read_text())
    return config["num_hidden_layers"] * config["num_experts_per_tok"]


def _series(result: dict, key: str) -> list:
    return [step["data"].get(key) for step in result["metrics"]]


@pytest.mark.slow
def test_r3_replays_the_rollout_routing_on_every_response_token(setup):
    r = _run(setup, "grpo_r3", "r3")
    assert [step["step"] for step in r["metrics"]] == [1, 2]
    assert _series(r, "r3/replay_active_frac") == [1.0, 1.0]
    assert _series(r, "r3/fallback_frac") == [0.0, 0.0]
    # What the experts received equals the rollout's routing, token by token and layer by layer.
    assert _series(r, "r3/router_disagree_replayed") == [0.0, 0.0]
    # The parameters change: non-zero gradients under replay, applied with a non-zero lr.
    assert all(g > 0 for g in _series(r, "actor/grad_norm")), _series(r, "actor/grad_norm")
    assert all(lr > 0 for lr in _series(r, "actor/lr"))
    # Mismatch metrics are logged: verl's own and ours over the same response tokens (verl's
    # rollout_corr/k3_kl is the same estimator over old_log_probs, computed in float32).
    for ours, verls in zip(_series(r, "r3/k3_kl"), _series(r, "rollout_corr/k3_kl")):
        assert ours == pytest.approx(verls, rel=1e-3, abs=1e-7) and ours > 0, (ours, verls)
    for tau in ("1.5", "2", "5", "10"):
        assert all(0 <= v <= 1 for v in _series(r, f"r3/extreme_frac_{tau}")), tau
    # Router figures per MoE layer (the quickstart model: 4 layers, all MoE), routing bytes, cost.
    for step in r["metrics"]:
        layers = sorted(k for k in step["data"] if k.startswith("r3/router_disagree_layer/"))
        assert layers == [f"r3/router_disagree_layer/{i:02d}" for i in range(4)], layers
        assert step["data"]["r3/router_disagree_token"] >= step["data"]["r3/router_disagree"]
        # One byte per (token, layer, k): verl_agent_loop_routing_0_9 carries uint8 where verl carries int16.
        assert step["data"]["r3/routing_bytes_per_token"] == _ids_per_token(setup)
        assert step["data"]["r3/metrics_seconds"] > 0 and 0 < step["data"]["r3/metrics_time_frac"] < 1
        assert not [k for k in step["data"] if "r3_stats" in k or k.startswith("actor/r3")]  # counts never logged
    # Every key the W&B dashboard plots is logged by a real run, and its per-layer regex finds the layers.
    from verl_r3.wandb_dashboard import PANELS

    logged = set(r["metrics"][-1]["data"])
    plotted = {k for panel in PANELS for k in panel.keys}
    assert plotted <= logged, plotted - logged
    for panel in (p for p in PANELS if p.regex):
        assert sum(bool(re.match(panel.regex, k)) for k in logged) == 4, panel
    assert glob.glob(os.path.join(os.path.dirname(r["log"]), "wandb", "wandb", "offline-run-*"))
    # verl synced the trained weights into vLLM (it starts from dummy weights): rollout and
    # trainer probabilities agree (about 0.06-0.11 correlation when the sync is broken).
    assert all(c > 0.9 for c in _series(r, "training/rollout_actor_probs_pearson_corr"))


@pytest.mark.slow
def test_r2_replays_the_routing_recorded_in_compute_log_prob(setup):
    r = _run(setup, "grpo_r2", "r2", engine="hf")
    assert _series(r, "r3/replay_active_frac") == [1.0, 1.0]
    # The recorded routing travels back one byte per id, like the rollout's.
    assert _series(r, "r3/routing_bytes_per_token") == [_ids_per_token(setup)] * 2
    # One mini-batch, one epoch: the update replays exactly what the same weights chose.
    assert _series(r, "r3/router_disagree") == [0.0, 0.0]
    assert all(g > 0 for g in _series(r, "actor/grad_norm"))

