"""Recipe scripts, run for real with ``SMOKE=1``: verl's trainer on CPU, 2 steps.

The script is started the way a user starts it (``SMOKE=1 bash recipes/<recipe>/run_....sh``). It
builds the tiny model and the recipe's offline data, then runs ``main_ppo`` with the recipe's
config, reward, and (agent) tool and agent loop. What is checked comes from what verl logged: its
metrics file and its rollout dumps (``trainer.rollout_data_dir``).

CI runs one script per recipe: the agent's GSPO+R3 on vLLM's CPU build (the recipes' default
engine), code's GRPO+R3 and math's GRPO+TIS (the one real TIS run of the suite) on the ``hf``
engine, which starts sooner (vLLM runs ``main_ppo`` end to end in
tests/integration/test_main_ppo_cpu.py and tests/quickstart/test_quickstart_run.py too). ``VERL_R3_SMOKE_ALL=1`` runs every script of every recipe (30 runs, about an hour on 2
cores).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("verl")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from recipe_scripts import MODELS, NAMES, ROOT, VARIANTS, recipe_env, script  # noqa: E402

RUN_TIMEOUT_S = 600   # the script's own limit (TIMEOUT_S); the test waits a little longer

CI_RUNS = [("math", "qwen3_30b_a3b", "grpo_tis", "hf"),
           ("code", "olmoe_1b_7b", "grpo_r3", "hf"),
           ("agent", "olmoe_1b_7b", "gspo_r3", "vllm")]
ALL_RUNS = [(r, m, v, "vllm") for r in NAMES for m in MODELS for v in VARIANTS]
RUNS = ALL_RUNS if os.environ.get("VERL_R3_SMOKE_ALL") == "1" else CI_RUNS


@pytest.fixture(scope="module")
def smoke_dirs(tmp_path_factory):
    """One model and data directory per recipe, shared by that recipe's runs (as SMOKE_DIR is)."""
    root = tmp_path_factory.mktemp("smoke")
    return {recipe: root / recipe for recipe in NAMES}


def _smoke(recipe: str, model: str, variant: str, engine: str, smoke_dir, out) -> tuple[list[dict], list[dict], str]:
    """Run the script; returns (verl's metrics per step, rollout dump rows, log)."""
    rollouts = out / "rollouts"
    env = recipe_env(SMOKE="1", ROLLOUT_ENGINE=engine, SMOKE_DIR=str(smoke_dir), OUT=str(out),
                     TIMEOUT_S=str(RUN_TIMEOUT_S), GROUP=f"smoke-{recipe}")
    log_path = out / "run.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(script(recipe, model, variant)), f"trainer.rollout_data_dir={rollouts}"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S + 90)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # Ray's processes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log_path.read_text(errors="replace")
    assert code == 0, f"SMOKE {recipe}/{model}/{variant} on {engine}: exit {code}\n{text[-6000:]}"
    metrics = [json.loads(line) for line in (out / f"{variant}.jsonl").read_text().splitlines() if line.strip()]
    dumps = [json.loads(line) for path in sorted(rollouts.glob("*.jsonl")) for line in path.read_text().splitlines()
             if line.strip()]
    return metrics, dumps, text


@pytest.mark.timeout(RUN_TIMEOUT_S + 240)
@pytest.mark.parametrize("recipe, model, variant, engine", RUNS, ids=["-".join(r) for r in RUNS])
@pytest.mark.slow
def test_recipe_script_smoke_runs(recipe, model, variant, engine, smoke_dirs, tmp_path):
    metrics, dumps, log = _smoke(recipe, model, variant, engine, smoke_dirs[recipe], tmp_path)
    assert [m["step"] for m in metrics] == [1, 2], log[-3000:]
    for m in metrics:
        data = m["data"]
        # routing captured by the engine reached the trainer in every variant
        assert data["r3/fallback_frac"] == 0.0
        assert data["r3/routing_bytes_per_token"] > 0
        assert math.isfinite(data["r3/k3_kl"]) and data["r3/k3_kl"] >= 0
        if variant.endswith("_r3"):  # every MoE layer replayed every response token, exactly
            assert data["r3/replay_active_frac"] == 1.0
            assert data["r3/router_disagree_replayed"] == 0.0
        else:  # no replay: the experts used are the trainer's own, disagreeing with the rollout's as measured
            assert data["r3/replay_active_frac"] == 0.0
            assert data["r3/router_disagree_replayed"] == data["r3/router_disagree"]
        if variant.endswith("_tis"):  # verl weighted each token by its rollout importance ratio
            assert data["rollout_corr/rollout_is_mean"] > 0
        # the update reached the parameters (with rewards of 0, through SMOKE's entropy term), under replay
        assert data["actor/grad_norm"] > 0 and data["actor/lr"] > 0
        assert 0.0 <= data["critic/score/mean"] <= 1.0
    # the model and data SMOKE built, where the recipe's prepare_data.py --smoke put them
    assert (smoke_dirs[recipe] / "model" / "config.json").is_file()
    assert (smoke_dirs[recipe] / "data" / "train.parquet").is_file()
    # verl scored every sampled response with the recipe's reward: 2 steps x 4 prompts x 2 samples
    assert len(dumps) == 16 and all(0.0 <= d["score"] <= 1.0 for d in dumps)
    assert {d["step"] for d in dumps} == {1, 2}
    if recipe == "agent":
        _check_agent_turns(metrics, dumps)


def _check_agent_turns(metrics, dumps) -> None:
    """3 assistant turns of at most 16 tokens, with the sandboxed tool's answers between them."""
    for m in metrics:
        # verl counts messages: the user's, then assistant / tool alternating, ending on the assistant
        assert m["data"]["num_turns/max"] == 6 and m["data"]["num_turns/min"] == 6, m["data"]["num_turns/max"]
    for d in dumps:
        assert d["input"].rstrip().endswith("assistant")
        # between the 3 assistant turns, 2 tool turns holding python_tool.format_result of a sandbox run
        assert d["output"].count("tool\n") == 2, d["output"]
        assert d["output"].count("assistant\n") == 2, d["output"]
        for turn in d["output"].split("tool\n")[1:]:
            answer = turn.split("assistant\n")[0]
            assert answer.startswith(("stderr:", "(no output")) or "(exit status" in answer or "(stopped" in answer, answer
