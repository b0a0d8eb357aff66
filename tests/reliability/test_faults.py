"""Faults in real ``main_ppo`` runs on CPU (Ray, TransferQueue, the FSDP2 actor with R3, verl's
checkpoints), injected by ``faults.py``: a worker killed mid-step, a rollout engine that dies
mid-batch, and replay that silently is not installed. Every run is under a wall-clock limit
whose expiry fails the test: an error must come, not a hang.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import pytest

pytest.importorskip("verl")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

from cpu_verl import ppo_inputs  # noqa: E402

from verl_r3.quickstart.runner import RunSpec, run_variant  # noqa: E402
TIMEOUT_S = 420
PROMPTS, N = 4, 2

# Varies from sample to sample (non-zero GRPO advantages) and records which dataset rows each
# run scored, in order: with data.shuffle=False step s trains rows [(s - 1) * PROMPTS, s * PROMPTS).
_REWARD = '''
import json, os

def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    with open(os.environ["R3_SEEN_FILE"], "a") as f:
        f.write(json.dumps((extra_info or {}).get("index")) + "\\n")
    text = solution_str or ""
    return len(set(text)) / (1.0 + len(text))
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return ppo_inputs(tmp_path_factory.mktemp("faults"), _REWARD)


def _run(setup, name: str, *, steps: int, fault: str = "", engine: str = "hf", extra=(), ckpt: str | None = None,
         logged_steps: int | None = None):
    root, model_dir, train, val, reward = setup
    spec = RunSpec(model=model_dir, train_file=train, val_file=val, reward_file=reward, out_dir=str(root / name),
                   steps=steps, prompts=PROMPTS, n=N, response_length=8, group=name, rollout_engine=engine)
    env = {
        "VERL_USE_EXTERNAL_MODULES": "verl_r3.integration.activate,faults",
        "PYTHONPATH": os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH", "")) if p),
        "R3_FAULT": fault, "R3_FAULT_MARKER": str(root / f"{name}.marker"), "R3_SEEN_FILE": str(root / f"{name}.seen"),
    }
    overrides = ["data.shuffle=False", *extra]
    if ckpt:
        overrides += [f"trainer.default_local_dir={ckpt}", "trainer.save_freq=1"]
    return run_variant("grpo_r3", spec, timeout_s=TIMEOUT_S, extra=overrides, env=env, logged_steps=logged_steps)


def _seen(setup, name: str) -> list[int]:
    with open(setup[0] / f"{name}.seen") as f:
        return [json.loads(line) for line in f if line.strip()]


def _rows_of_steps(first: int, last: int) -> collections.Counter:
    return collections.Counter(i for i in range((first - 1) * PROMPTS, last * PROMPTS) for _ in range(N))


@pytest.mark.slow
def test_a_worker_killed_mid_step_resumes_from_the_checkpoint_with_r3_and_no_lost_or_repeated_samples(setup):
    ckpt = str(setup[0] / "ckpt")
    with pytest.raises(RuntimeError) as err:
        _run(setup, "killed", steps=4, fault="kill_actor:3", ckpt=ckpt)
    message = str(err.value)
    assert "exited with" in message and "2/4 steps logged" in message, message[-3000:]  # an error, not a hang
    assert "died" in message.lower(), message[-3000:]
    assert sorted(os.listdir(ckpt)) == ["global_step_1", "global_step_2", "latest_checkpointed_iteration.txt"]

    resumed = _run(setup, "resumed", steps=4, ckpt=ckpt, extra=["trainer.resume_mode=auto"], logged_steps=2)
    assert [m["step"] for m in resumed["metrics"]] == [3, 4]
    config = json.loads((setup[0] / "model" / "config.json").read_text())
    for m in resumed["metrics"]:
        assert m["data"]["r3/replay_active_frac"] == 1.0 and m["data"]["r3/fallback_frac"] == 0.0
        assert m["data"]["r3/router_disagree_replayed"] == 0.0 and m["data"]["actor/grad_norm"] > 0
        # The hf engine's routing reached the trainer one byte per id.
        assert m["data"]["r3/routing_bytes_per_token"] == config["num_hidden_layers"] * config["num_experts_per_tok"]
    # The killed run trained steps 1 and 2 (rows 0-7) and scored step 3 before dying; the resumed run
    # trained steps 3 and 4 (rows 8-15). Together: every row of steps 1-4 trained once per sample.
    killed, again = _seen(setup, "killed"), _seen(setup, "resumed")
    assert collections.Counter(killed[: 2 * PROMPTS * N]) == _rows_of_steps(1, 2)
    assert collections.Counter(again) == _rows_of_steps(3, 4)


@pytest.mark.slow
def test_a_rollout_engine_that_dies_mid_batch_ends_the_run_with_an_error(setup):
    with pytest.raises(RuntimeError) as err:
        _run(setup, "rollout_dies", steps=3, fault="kill_rollout:2")
    message = str(err.value)
    assert "exited with" in message and "2/3 steps logged" in message, message[-3000:]
    assert "RolloutServerDied: training step 3 failed and 1 rollout server(s) are dead: replica 0: HFRolloutServer" \
        in message, message[-3000:]


@pytest.mark.slow
def test_replay_that_is_silently_not_installed_stops_the_run_at_the_first_step(setup):
    with pytest.raises(RuntimeError) as err:
        _run(setup, "skip_replay", steps=2, fault="skip_replay")
    message = str(err.value)
    assert "0/2 steps logged" in message, message[-3000:]
    assert "verl_r3 replay check, step 1, router_replay.mode=R3: compute_log_prob: 0 of " in message, message[-3000:]
    assert "update_actor: 0 of " in message and "MoE layers ran without replay" in message
    assert "router_replay.strict=False" in message
