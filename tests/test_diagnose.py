"""``verl-r3 diagnose`` (verl_r3.diagnose): real rollouts with routing capture, three trainer
recomputations, metrics.json and figures.

The demo runs end to end in a subprocess (as ``python -m verl_r3.diagnose --demo``) under a
wall-clock limit; a second family with a dense layer runs in this process with the hf engine
and a jsonl prompts file; vLLM (when installed) and SGLang (in its own environment, like
tests/engines/test_sglang_capture.py) roll out on the demo's model.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from verl_r3 import diagnose
from verl_r3.quickstart.model import build_tokenizer
from verl_r3.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 1200  # about 100 s on 2 idle cores; other work on the machine can slow it several-fold
ENGINE_TIMEOUT_S = 300
SGLANG_ENV_TIMEOUT_S = 1200  # only when scripts/sglang_env.sh has to build the environment
KEYS = ("k3_kl", "extreme_frac_1.5", "extreme_frac_2", "extreme_frac_5", "extreme_frac_10", "tokens",
        "router_disagree", "router_disagree_token", "router_disagree_layers_per_token", "router_disagree_per_layer")


def run_module(args: list[str], timeout: int, **env_vars: str) -> subprocess.CompletedProcess:
    """``python -m verl_r3.diagnose ARGS`` in its own process group, killed whole on timeout (the
    engines start processes of their own)."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **env_vars)
    proc = subprocess.Popen([sys.executable, "-m", "verl_r3.diagnose", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"diagnose {args} exceeded {timeout} s; stderr tail:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_figures(out: Path) -> None:
    for name in diagnose.FIGURES:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)
        assert image.std() > 0, f"{name} is blank"


def check_comparisons(metrics: dict, layers: int) -> None:
    for key in ("no_replay", "replay", "forward_twice"):
        assert all(k in metrics[key] for k in KEYS), (key, sorted(metrics[key]))
        assert metrics[key]["tokens"] == metrics["setup"]["tokens"] > 0
        assert len(metrics[key]["router_disagree_per_layer"]) == layers
    # R3 makes the trainer use exactly the rollout's experts: nothing differs, nothing falls back.
    assert metrics["replay"]["router_disagree"] == 0 and metrics["replay"]["fallback"] == 0
    assert metrics["replay"]["replayed"] > 0
    assert metrics["router_grads_nonzero"] and all(g > 0 for g in metrics["router_grad_abs_sum"])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnose_demo")
    proc = run_module(["--demo", "--out", str(out)], DEMO_TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return out, proc.stdout, json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_demo_shows_r3_removing_routing_mismatch(demo_run):
    out, stdout, metrics = demo_run
    setup = metrics["setup"]
    assert (setup["family"], setup["engine"], setup["rollout_dtype"], setup["train_dtype"]) == \
        ("qwen3_moe", "hf", "bfloat16", "float32")
    check_comparisons(metrics, setup["layers"])
    check_figures(out)
    no, yes, twice = metrics["no_replay"], metrics["replay"], metrics["forward_twice"]
    print(f"\nk3 KL no_replay {no['k3_kl']:.3e} replay {yes['k3_kl']:.3e}; F(2) no_replay {no['extreme_frac_2']:.3e} "
          f"replay {yes['extreme_frac_2']:.3e}; router disagree {no['router_disagree']:.3e}; {setup['seconds']} s")
    # bf16 rollout vs fp32 trainer: routing flips, and replaying the rollout's routing lowers the mismatch.
    assert no["router_disagree"] > 0 and 1 <= no["router_disagree_layers_per_token"] <= setup["layers"]
    assert yes["k3_kl"] < no["k3_kl"]
    assert yes["extreme_frac_2"] < no["extreme_frac_2"]
    # The fp32 trainer on a CPU is deterministic.
    assert twice["k3_kl"] == 0 and twice["router_disagree"] == 0
    hist = metrics["differing_layers_hist"]
    assert len(hist) == setup["layers"] + 1 and sum(hist) == setup["tokens"]
    assert sum(hist[1:]) / sum(hist) == pytest.approx(no["router_disagree_token"])
    # The printed table: one row per comparison, then the files written.
    for key in ("no_replay", "replay", "forward_twice"):
        assert any(line.startswith(key) for line in stdout.splitlines()), stdout
    assert str(out / "metrics.json") in stdout and str(out / "prob_scatter.png") in stdout


@pytest.fixture(scope="module")
def dense_family_dir(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 (layer 0 dense, sigmoid router) with the quickstart's byte tokenizer."""
    path = tmp_path_factory.mktemp("deepseek_v3")
    tokenizer = build_tokenizer()
    model = tiny_model("deepseek_v3", seed=1, vocab_size=264, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_second_family_with_dense_layer_and_jsonl_prompts(dense_family_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Ann has 3 pens, gets 4 more. How many?"},
             {"prompt": [{"role": "user", "content": "Bob had 9 cups, lost 2. How many left?"}], "id": 7},
             {"prompt": "12+30="}]
    prompts.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    metrics = diagnose.run(str(dense_family_dir), out=tmp_path / "out", prompts=str(prompts), engine="hf",
                           samples=2, max_new_tokens=6, seed=3)
    setup = metrics["setup"]
    assert (setup["family"], setup["prompts"], setup["sequences"], setup["moe_layers"]) == \
        ("deepseek_v3", 3, 6, [1, 2])
    check_comparisons(metrics, 3)
    check_figures(tmp_path / "out")
    for key in ("no_replay", "replay", "forward_twice"):
        per_layer = metrics[key]["router_disagree_per_layer"]
        assert per_layer[0] is None and all(isinstance(v, float) for v in per_layer[1:])  # layer 0 is dense
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["setup"]["prompts_file"] == str(prompts)


def test_parquet_prompts_are_the_token_ids_verl_sends_to_the_rollout(tmp_path):
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    from verl_r3.quickstart.data import write_parquet

    train, _ = write_parquet(tmp_path, train_size=6, test_size=1, seed=4)
    tokenizer = build_tokenizer()
    ids = diagnose.load_prompts(train, tokenizer, limit=5)
    builder = create_continuous_token_builder(tokenizer, hf_model_type="qwen3_moe")  # what verl's agent loop uses
    expected = [builder.build_initial_tokens(list(messages)) for messages in pd.read_parquet(train)["prompt"][:5]]
    assert len(ids) == 5 and ids == expected


def test_bad_inputs_fail_with_the_cause(dense_family_dir, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        diagnose.run(str(tmp_path / "missing"), out=tmp_path / "o")
    with pytest.raises(ValueError, match="unknown engine 'trtllm'"):
        diagnose.run(str(dense_family_dir), out=tmp_path / "o", engine="trtllm")
    with pytest.raises(ValueError, match="no model: give --model DIR"):
        diagnose.run(None, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # inputs are checked before anything is written
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no \"prompt\" field"):
        diagnose.run(str(dense_family_dir), out=tmp_path / "o", prompts=str(bad))
    messages = tmp_path / "messages.jsonl"
    messages.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="line 1: message 0 of the prompt"):
        diagnose.run(str(dense_family_dir), out=tmp_path / "o", prompts=str(messages))
    table = tmp_path / "questions.parquet"
    pd.DataFrame({"question": ["a", "b"]}).to_parquet(table)
    with pytest.raises(ValueError, match="no 'prompt' column"):
        diagnose.run(str(dense_family_dir), out=tmp_path / "o", prompts=str(table))
    rows = tmp_path / "rows.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "hi"}], []]}).to_parquet(rows)
    with pytest.raises(ValueError, match="rows.parquet, row 1: prompt is an empty list of messages"):
        diagnose.run(str(dense_family_dir), out=tmp_path / "o", prompts=str(rows))
    dense = tmp_path / "llama"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    (dense / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="'llama' is not a supported MoE family"):
        diagnose.run(str(dense), out=tmp_path / "o")


def test_command_line_reports_errors_with_exit_code_2(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    diagnose.add_arguments(parser)
    assert diagnose.main(parser.parse_args(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)])) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--demo", "--engine", "trtllm"])
    assert exc.value.code == 2
    assert "invalid choice: 'trtllm'" in capsys.readouterr().err


@pytest.mark.slow
def test_vllm_rollout_on_the_demo_model(demo_run, tmp_path):
    pytest.importorskip("vllm")
    model = demo_run[0] / "model"
    proc = run_module(["--model", str(model), "--engine", "vllm", "--num-prompts", "48", "--samples", "2",
                       "--max-new-tokens", "8", "--out", str(tmp_path)], ENGINE_TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["setup"]["engine"] == "vllm" and metrics["setup"]["sequences"] == 96
    check_comparisons(metrics, metrics["setup"]["layers"])
    check_figures(tmp_path)
    no, yes = metrics["no_replay"], metrics["replay"]
    print(f"\nvllm: k3 KL no_replay {no['k3_kl']:.3e} replay {yes['k3_kl']:.3e}; router disagree "
          f"{no['router_disagree']:.3e}")
    # vLLM's bf16 CPU kernels and the fp32 trainer disagree; the log-probs are of the same tokens.
    assert no["k3_kl"] > 0 and no["extreme_frac_10"] < 0.01


def sglang_python() -> str:
    """SGLang's interpreter: VERL_R3_SGLANG_PYTHON, else the environment scripts/sglang_env.sh builds
    (``make test`` builds it before the tests, as for tests/engines/test_sglang_capture.py)."""
    if os.environ.get("VERL_R3_SGLANG_PYTHON"):
        return os.environ["VERL_R3_SGLANG_PYTHON"]
    done = subprocess.run(["bash", str(ROOT / "scripts" / "sglang_env.sh")], capture_output=True, text=True,
                          timeout=SGLANG_ENV_TIMEOUT_S)
    assert done.returncode == 0, f"scripts/sglang_env.sh failed:\n{done.stderr[-4000:]}"
    return str(Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python")


@pytest.mark.slow
def test_sglang_rollout_on_the_demo_model(demo_run, tmp_path):
    model = demo_run[0] / "model"
    proc = run_module(["--model", str(model), "--engine", "sglang", "--num-prompts", "24", "--samples", "2",
                       "--out", str(tmp_path)], ENGINE_TIMEOUT_S, VERL_R3_SGLANG_PYTHON=sglang_python())
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["setup"]["engine"] == "sglang" and metrics["setup"]["sequences"] == 48
    check_comparisons(metrics, metrics["setup"]["layers"])
    no, yes = metrics["no_replay"], metrics["replay"]
    print(f"\nsglang: k3 KL no_replay {no['k3_kl']:.3e} replay {yes['k3_kl']:.3e}; router disagree "
          f"{no['router_disagree']:.3e}")
    assert no["k3_kl"] > 0 and no["extreme_frac_10"] < 0.01
