"""The quickstart's parts: data files verl reads, the reward, the model directory, the report."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from verl_r3 import keys
from verl_r3.report import load_jsonl
from verl_r3.quickstart import data, model, report, reward

# ----------------------------------------------------------------------------------------- data


def _operands(question: str) -> tuple[int, int]:
    a, b = (int(x) for x in re.findall(r"\d+", question))
    return a, b


def test_word_problems_are_deterministic_distinct_short_and_right():
    problems = data.word_problems(500, seed=3)
    assert problems == data.word_problems(500, seed=3)
    assert problems != data.word_problems(500, seed=4)
    assert len({p["question"] for p in problems}) == 500
    sums = differences = 0
    for p in problems:
        assert len(p["question"]) <= 41
        a, b = _operands(p["question"])
        assert 0 <= a <= 99 and 0 <= b <= 99
        answer = int(p["answer"])
        assert p["answer"] == str(answer) and answer in (a + b, a - b) and answer >= 0
        sums += answer == a + b != a - b
        differences += answer == a - b != a + b
    assert sums > 100 and differences > 100


def test_word_problems_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0"):
        data.word_problems(-1, seed=0)


def test_write_parquet_round_trip_has_verl_columns_and_disjoint_splits(tmp_path):
    train_path, test_path = data.write_parquet(tmp_path / "d", train_size=40, test_size=10, seed=1)
    train, test = pd.read_parquet(train_path), pd.read_parquet(test_path)
    assert len(train) == 40 and len(test) == 10
    for frame, split in ((train, "train"), (test, "test")):
        assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        row = frame.iloc[3]
        assert row["data_source"] == "verl_r3/arithmetic"
        assert row["ability"] == "math"
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert row["reward_model"] == {"style": "rule", "ground_truth": row["extra_info"]["answer"]}
        assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == 3
        assert row["extra_info"]["question"] == row["prompt"][0]["content"]
    train_q = {m[0]["content"] for m in train["prompt"]}
    test_q = {m[0]["content"] for m in test["prompt"]}
    assert not train_q & test_q


@pytest.fixture(scope="module")
def tokenizer():
    return model.build_tokenizer()


def test_verl_rl_dataset_reads_the_parquet(tmp_path, tokenizer):
    from verl.utils.dataset.rl_dataset import RLHFDataset

    train_path, _ = data.write_parquet(tmp_path, train_size=16, test_size=4, seed=0)
    config = OmegaConf.create({"max_prompt_length": 64, "filter_overlong_prompts": True,
                               "cache_dir": str(tmp_path / "cache")})
    dataset = RLHFDataset(data_files=[str(train_path)], tokenizer=tokenizer, config=config)
    assert len(dataset) == 16  # every prompt fits in 64 tokens
    item = dataset[0]
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["reward_model"]["ground_truth"] == item["extra_info"]["answer"]


# --------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("response, truth, score", [
    ("42", "42", 1.0),
    (" 42 pens", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("042", "42", 1.0),
    ("41", "42", 0.0),
    ("4 2", "42", 0.0),
    ("-42", "42", 0.0),
    ("12 then 42", "42", 0.0),
    ("0", "0", 1.0),
    ("", "42", 0.0),
    ("\x00\ufffd<|im_end|>??", "42", 0.0),
    ("9" * 5000, "42", 0.0),
    (None, "42", 0.0),
    ("42", "forty-two", 0.0),
    ("42", 42, 1.0),
])
def test_compute_score(response, truth, score):
    assert reward.compute_score("verl_r3/arithmetic", response, truth, extra_info={"index": 0}) == score


def test_compute_score_loads_through_verls_custom_reward_function():
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": reward.__file__, "name": "compute_score", "reward_kwargs": {"unused": 1}}}})
    fn = get_custom_reward_fn(config)
    assert fn(data_source="verl_r3/arithmetic", solution_str="17\n", ground_truth="17", extra_info={}) == 1.0
    assert fn(data_source="verl_r3/arithmetic", solution_str="18", ground_truth="17", extra_info={}) == 0.0


# ---------------------------------------------------------------------------------------- model


def test_chat_template_renders_prompt_and_answer(tokenizer):
    messages = [{"role": "user", "content": "Ann has 17 pens, gets 25 more. How many?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>user\nAnn has 17 pens, gets 25 more. How many?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert prompt.endswith(model.GENERATION_PROMPT)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "42"}], tokenize=False)
    assert full == prompt + "42<|im_end|>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 2 and ids.count(end) == 1 and tokenizer.eos_token_id == end
    # one token per byte otherwise, "\n" included
    assert len(ids) == len(prompt.replace("<|im_start|>", "S").replace("<|im_end|>", "E"))
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nAnn has 17 pens, gets 25 more. How many?\n" \
                                                              "assistant\n"


def test_every_prompt_fits_the_quickstart_prompt_length(tokenizer):
    problems = data.word_problems(2000, seed=0)
    lengths = [len(tokenizer(model.render_prompt(tokenizer, p["question"]), add_special_tokens=False)["input_ids"])
               for p in problems]
    assert max(lengths) <= 64
    answers = [len(tokenizer(p["answer"], add_special_tokens=False)["input_ids"]) + 1 for p in problems]
    assert max(answers) <= 4  # three digits and the end-of-turn token


def test_build_config_every_layer_moe_and_small(tokenizer):
    config = model.build_config(tokenizer)
    assert config.mlp_only_layers == [] and config.num_experts == 8 and config.num_experts_per_tok == 2
    assert config.vocab_size % 8 == 0 and config.vocab_size >= len(tokenizer)
    assert config.head_dim == 32 and config.num_attention_heads * config.head_dim == config.hidden_size
    with pytest.raises(ValueError, match="hidden_size"):
        model.build_config(tokenizer, hidden_size=48)
    with pytest.raises(ValueError, match="top_k"):
        model.build_config(tokenizer, experts=4, top_k=5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs_model")
    figures = model.build_model_dir(out, warm_start_steps=5, batch_size=16, log=None)
    return out, figures


def test_build_model_dir_saves_a_loadable_verl_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from verl.workers.config import HFModelConfig

    out, figures = model_dir
    assert set(figures) >= {"params", "warm_start_loss", "greedy_accuracy", "seconds", "warm_start_steps"}
    assert json.loads((out / "warm_start.json").read_text()) == figures
    assert 100_000 < figures["params"] < 3_000_000
    assert figures["warm_start_steps"] == 5 and figures["warm_start_loss"] > 0
    assert 0.0 <= figures["greedy_accuracy"] <= 1.0

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.model_type == "qwen3_moe" and loaded.dtype == torch.float32
    assert sum(p.numel() for p in loaded.parameters()) == figures["params"]
    assert (out / "model.safetensors").exists()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == model.CHAT_TEMPLATE
    assert model.render_prompt(tok, "Q?") == model.render_prompt(model.build_tokenizer(), "Q?")
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)

    hf = HFModelConfig(path=str(out))
    assert hf.tokenizer.eos_token_id == tok.eos_token_id
    assert hf.hf_config.num_experts == 8


def _fresh_model(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.slow
def test_warm_start_learns_some_arithmetic(tokenizer):
    # A quarter of the default budget: the answer loss falls well below the untrained model's and
    # some held-out problems come out right (the full warm start reaches 25-60%, too slow here).
    torch.manual_seed(0)
    net = _fresh_model(model.build_config(tokenizer))
    problems = data.word_problems(256 + 400 * 32, seed=5)
    holdout, train = problems[:256], problems[256:]
    assert model.greedy_accuracy(net, tokenizer, holdout[:64]) == 0.0
    loss = model.warm_start(net, tokenizer, train, steps=400, batch_size=32, log=None)
    assert loss < 1.4
    assert 0.0 < model.greedy_accuracy(net, tokenizer, holdout) < 0.5
    signal = model.sampled_signal(net, tokenizer, holdout[:64], samples=4, seed=0)
    assert 0.0 < signal["sampled_accuracy"] < 0.5 and 0.0 < signal["mixed_groups"] <= 1.0


def test_warm_start_rejects_too_few_problems(tokenizer):
    net = _fresh_model(model.build_config(tokenizer, layers=1))
    with pytest.raises(ValueError, match="batches"):
        model.warm_start(net, tokenizer, data.word_problems(10, seed=0), steps=2, batch_size=8, log=None)


# --------------------------------------------------------------------------------------- report
# The report itself is verl_r3.report (tests/test_report.py); here: the quickstart's run directory.


def _write_variant(run_dir: Path, variant: str, values: dict[str, list[float]], meta: dict | None = None) -> None:
    n = len(next(iter(values.values())))
    # verl logs pre-training validation at step 0 on its own line.
    records = [{"step": 0, "data": {"val-core/acc": 0.1}}]
    records += [{"step": s + 1, "data": {k: v[s] for k, v in values.items()}} for s in range(n)]
    (run_dir / f"{variant}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if meta is not None:
        (run_dir / f"{variant}.meta.json").write_text(json.dumps(meta))


@pytest.fixture()
def run_dir(tmp_path):
    full = {
        keys.REWARD: [0.2, 0.5, 0.4],
        keys.K3_KL: [0.01, 0.02, 0.03],
        keys.EXTREME_FRAC_2: [0.1, 0.0, 0.2],
        keys.ROUTER_DISAGREE: [0.3, 0.3, 0.6],
        keys.ROUTER_DISAGREE_REPLAYED: [0.0, 0.0, 0.0],
        keys.REPLAY_ACTIVE_FRAC: [1.0, 1.0, 1.0],
        keys.METRICS_TIME_FRAC: [0.01, 0.02, 0.03],
        keys.STEP_TIME: [9.0, 2.0, 4.0],
        "actor/pg_loss": [1.0, 2.0, 3.0],
    }
    _write_variant(tmp_path, "grpo_r3", full, {"variant": "grpo_r3", "group": "qs", "steps": 3, "wall_s": 60.0})
    plain = {k: v for k, v in full.items() if not k.startswith(keys.ROUTER_DISAGREE) and k != keys.STEP_TIME}
    _write_variant(tmp_path, "grpo", plain, {"variant": "grpo", "group": "qs", "seconds_per_step": 1.5, "steps": 3})
    return tmp_path


def test_quickstart_summary_is_keyed_by_variant_with_exact_figures(run_dir):
    summary = report.summarize(run_dir)
    assert list(summary) == ["grpo", "grpo_r3"]
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    r3 = summary["grpo_r3"]
    assert (r3["group"], r3["variant"], r3["steps"]) == ("qs", "grpo_r3", 3)
    assert r3["final_reward"] == 0.4 and r3["best_reward"] == 0.5
    assert r3["first_k3_kl"] == 0.01 and r3["mean_k3_kl"] == pytest.approx(0.02)
    assert r3["mean_router_disagree"] == pytest.approx(0.4) and r3["mean_router_disagree_replayed"] == 0.0
    assert r3["seconds_per_step"] == statistics.median([2.0, 4.0])  # the first step is left out
    grpo = summary["grpo"]
    assert grpo["mean_router_disagree"] is None and grpo["mean_router_disagree_replayed"] is None
    assert grpo["seconds_per_step"] == 1.5  # from grpo.meta.json
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quickstart_report_md_has_its_title_legend_and_notes(run_dir):
    report.summarize(run_dir)
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# Quickstart report\n")
    row = next(line for line in text.splitlines() if line.startswith("| grpo |"))
    assert row.count("n/a") == 2
    assert "| grpo_r3 | qs | grpo_r3 | 3 | 0.4 | 0.5 | 0.01 | 0.02 | 0.1 | 0.4 | 0 | 1 | 3 | 0.02 |" in text
    assert f"`{keys.ROUTER_DISAGREE}` not logged by run `grpo`" in text
    assert f"`{keys.ROUTER_DISAGREE_REPLAYED}` not logged by run `grpo`" in text
    assert "With `ROLLOUT_ENGINE=hf` (requests seeded by prompt) they score the same rollouts at step 1" in text
    assert text.count("**k3 KL, step 1**") == 1  # the quickstart's legend replaces the general one


def test_quickstart_wandb_runs_of_the_same_variants_are_not_counted_twice(run_dir, monkeypatch):
    # The runner logs every variant to <variant>.jsonl and to a W&B run under wandb/ (WANDB_DIR).
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    steps = load_jsonl(run_dir / "grpo_r3.jsonl")
    run = wandb.init(project="verl_r3_quickstart", name="qs-grpo_r3", group="qs", job_type="grpo_r3",
                     dir=str(run_dir / "wandb"), mode="offline",
                     settings=wandb.Settings(console="off", x_disable_stats=True, x_save_requirements=False))
    for step, data in sorted(steps.items()):
        run.log(data, step=step)
    run.finish()
    assert list((run_dir / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    summary = report.summarize(run_dir)
    assert list(summary) == ["grpo", "grpo_r3"]
    assert summary["grpo_r3"]["source"] == str(run_dir / "grpo_r3.jsonl")
    text = (run_dir / "report.md").read_text()
    assert "1 run(s) found both as a .jsonl file and as a W&B run" in text and "`grpo_r3.jsonl` = `offline-run-" in text
