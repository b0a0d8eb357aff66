"""verl's own SGLang rollout server in ``main_ppo`` on CPU, with R3, in SGLang's environment.

The run uses the interpreter of ``scripts/sglang_env.sh`` (SGLang pins its own torch) with
this checkout on PYTHONPATH, exactly as ``ROLLOUT_ENGINE=sglang make quickstart`` does:
Ray, TransferQueue, the FSDP2 actor with ``FSDPReplayEngine``, verl's SGLang server on
SGLang's CPU device (bf16) with native routing capture, kept and sent one byte per id
(``sglang_compact_routing_0_5``), weights synced every step.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("verl")

from verl_r3.quickstart import data, model  # noqa: E402
from verl_r3.quickstart.runner import RunSpec, run_variant  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 480

_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    text = solution_str or ""
    return len(set(text)) / (1.0 + len(text))
'''


@pytest.fixture(scope="module")
def sglang_python():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "sglang_env.sh")], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(proc.stdout.strip(), "bin", "python")


@pytest.mark.slow
def test_r3_through_verls_sglang_server(sglang_python, tmp_path):
    model.build_model_dir(tmp_path / "model", warm_start_steps=0, log=None)
    train, val = data.write_parquet(tmp_path / "data", train_size=64, test_size=8, seed=0)
    (tmp_path / "reward.py").write_text(_REWARD)
    spec = RunSpec(model=str(tmp_path / "model"), train_file=str(train), val_file=str(val),
                   reward_file=str(tmp_path / "reward.py"), out_dir=str(tmp_path / "run"), steps=2, prompts=4, n=2,
                   response_length=8, group="sglang", rollout_engine="sglang")
    r = run_variant("grpo_r3", spec, timeout_s=TIMEOUT_S, python=sglang_python)

    def series(key):
        return [step["data"].get(key) for step in r["metrics"]]

    assert series("r3/replay_active_frac") == [1.0, 1.0]
    assert series("r3/fallback_frac") == [0.0, 0.0]
    assert series("r3/router_disagree_replayed") == [0.0, 0.0]
    assert all(g > 0 for g in series("actor/grad_norm"))
    # SGLang started from the model's weights and got the trained ones at step 2.
    assert all(c > 0.9 for c in series("training/rollout_actor_probs_pearson_corr"))
    # verl's server launched SGLang with compact routing, and SGLang's processes sent it so: the
    # server warns when a payload arrives in another width than the one it asked for.
    log = Path(r["log"]).read_text(errors="replace")
    assert "SGLang sent routing as" not in log
