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


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _steps(values: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"step": s + 1, "data": {k: v[s] for k, v in values.items()}} for s in range(n)]


@pytest.fixture()
def run_dir(tmp_path):
    full = {
        report.REWARD_KEY: [0.2, 0.5, 0.4],
        report.K3_KL_KEY: [0.01, 0.02, 0.03],
        report.EXTREME_FRAC_2_KEY: [0.1, 0.0, 0.2],
        report.ROUTER_DISAGREE_KEY: [0.3, 0.3, 0.6],
        report.ROUTER_DISAGREE_REPLAYED_KEY: [0.0, 0.0, 0.0],
        report.STEP_TIME_KEY: [9.0, 2.0, 4.0],
        "actor/pg_loss": [1.0, 2.0, 3.0],
    }
    # verl logs pre-training validation at step 0 on its own line.
    _write_jsonl(tmp_path / "grpo_r3.jsonl", [{"step": 0, "data": {"val-core/acc": 0.1}}] + _steps(full))
    plain = {k: v for k, v in full.items() if "/r3/router" not in k and k != report.STEP_TIME_KEY}
    _write_jsonl(tmp_path / "grpo.jsonl", _steps(plain))
    (tmp_path / "grpo.meta.json").write_text(json.dumps({"seconds_per_step": 1.5, "steps": 3}))
    return tmp_path


def test_summarize_exact_figures(run_dir):
    summary = report.summarize(run_dir)
    assert list(summary) == ["grpo", "grpo_r3"]
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    r3 = summary["grpo_r3"]
    assert r3["steps"] == 3
    assert r3["final_reward"] == 0.4 and r3["best_reward"] == 0.5
    assert r3["first_k3_kl"] == 0.01 and r3["mean_k3_kl"] == pytest.approx(0.02)
    assert r3["mean_extreme_frac_2"] == pytest.approx(0.1)
    assert r3["mean_router_disagree"] == pytest.approx(0.4)
    assert r3["mean_router_disagree_replayed"] == 0.0
    assert r3["seconds_per_step"] == statistics.median([2.0, 4.0])  # the first step is left out
    assert set(r3) == set(report.SUMMARY_FIELDS)


def test_missing_metric_is_null_na_and_noted(run_dir):
    summary = report.summarize(run_dir)
    grpo = summary["grpo"]
    assert grpo["mean_router_disagree"] is None and grpo["mean_router_disagree_replayed"] is None
    assert grpo["seconds_per_step"] == 1.5  # from grpo.meta.json
    assert json.loads((run_dir / "summary.json").read_text())["grpo"]["mean_router_disagree"] is None
    text = (run_dir / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| grpo |"))
    assert row.count("n/a") == 2
    assert "`actor/r3/router_disagree` missing from `grpo.jsonl`" in text
    assert "`actor/r3/router_disagree_replayed` missing from `grpo.jsonl`" in text
    assert "grpo_r3.jsonl` " not in text.split("## Notes")[1]  # nothing missing for grpo_r3
    for word in ("k3 KL", "F(2)", "beyond 2 either way", "top-k expert set", "actually used"):
        assert word in text


def test_curves_png_is_a_png(run_dir):
    import matplotlib.pyplot as plt

    report.summarize(run_dir)
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = plt.imread(png).shape
    assert width > 500 and height > 400


def test_report_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="no <variant>.jsonl"):
        report.summarize(tmp_path)
    _write_jsonl(tmp_path / "ppo.jsonl", [{"step": 1, "data": {}}])
    with pytest.raises(ValueError, match=r"unknown variant file\(s\) ppo.jsonl"):
        report.summarize(tmp_path)
    (tmp_path / "ppo.jsonl").unlink()
    (tmp_path / "gspo.jsonl").write_text('{"step": 1, "data": {}}\n{"step": 2, "data": \n')
    with pytest.raises(ValueError, match=r"gspo.jsonl:2: not a JSON line"):
        report.summarize(tmp_path)
    (tmp_path / "gspo.jsonl").write_text('{"step": "one", "data": {}}\n')
    with pytest.raises(ValueError, match=r"gspo.jsonl:1: expected a FileLogger record"):
        report.summarize(tmp_path)


def test_main_writes_files_and_prints_table(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| variant | steps | final reward")
    assert "| grpo_r3 | 3 | 0.4 | 0.5 | 0.01 | 0.02 | 0.1 | 0.4 | 0 | 3 |" in out
    assert "missing from `grpo.jsonl`" in out
    for name in ("summary.json", "report.md", "curves.png"):
        assert (run_dir / name).exists()
    assert report.main([str(run_dir / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err
