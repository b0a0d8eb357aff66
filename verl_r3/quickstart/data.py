"""Short arithmetic word problems and verl's RL parquet format for the quickstart.

The quickstart trains a byte-level model, so every character is a token: the problems are
one-step additions and subtractions of operands 0-99 in a handful of short templates
("Ann has 17 pens, gets 25 more. How many?" -> "42"), half of them with a round second
operand ("gets 20 more"). They are generated from a seed, so a run is reproducible without
downloading a data set.

``write_parquet`` writes the columns verl's ``examples/data_preprocess/gsm8k.py`` produces
(``data_source``, ``prompt``, ``ability``, ``reward_model``, ``extra_info``), which is what
``verl.utils.dataset.rl_dataset.RLHFDataset`` and the reward managers read.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

__all__ = ["DATA_SOURCE", "word_problems", "to_rows", "write_parquet"]

DATA_SOURCE = "verl_r3/arithmetic"

_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eli", "Fay", "Gus", "Ida", "Jo", "Kim", "Lu", "Max")
_ITEMS = ("pens", "cups", "eggs", "hats", "keys", "toys", "bags", "jars", "mugs", "pins")

# (template, operation): "+" -> a + b, "-" -> a - b with b <= a. At most 41 characters filled in, so
# a prompt in the quickstart chat template stays within 60 tokens. Items are all four letters, which
# keeps the operands at few distinct offsets from the answer.
_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{n} has {a} {i}, gets {b} more. How many?", "+"),
    ("{n} had {a} {i}, found {b}. How many now?", "+"),
    ("{n} has {a} {i} and {b} more. How many?", "+"),
    ("{n} had {a} {i}, lost {b}. How many left?", "-"),
    ("{n} had {a} {i}, sold {b}. How many now?", "-"),
)

_MAX_OPERAND = 99

# Share of problems whose second operand is a multiple of ten ("gets 20 more"). Their ones digit
# is a copy, which a tiny model learns within a short warm start, and learning it also speeds up
# the ones-digit sums of the other half: the warm-started model ends up partly right, a spread
# of difficulty that gives GRPO groups mixed rewards.
_ROUND_SHARE = 0.5


def _one_problem(rng: random.Random) -> dict[str, str]:
    template, op = rng.choice(_TEMPLATES)
    a = rng.randint(0, _MAX_OPERAND)
    b = 10 * rng.randint(0, _MAX_OPERAND // 10) if rng.random() < _ROUND_SHARE else rng.randint(0, _MAX_OPERAND)
    if op == "-" and b > a:
        a, b = b, a
    answer = a + b if op == "+" else a - b
    question = template.format(n=rng.choice(_NAMES), i=rng.choice(_ITEMS), a=a, b=b)
    return {"question": question, "answer": str(answer)}


def word_problems(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct problems ``{"question", "answer"}``, the same for the same ``seed``.

    Answers are non-negative integers written in decimal; questions are at most 41 characters.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(f"could not draw {n} distinct problems (only {len(out)} found)")
        problem = _one_problem(rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            out.append(problem)
    return out


def to_rows(problems: list[dict[str, str]], split: str) -> list[dict]:
    """Problems as verl RL dataset rows (the gsm8k preprocessing layout)."""
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p["question"]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p["answer"]},
            "extra_info": {"split": split, "index": idx, "question": p["question"], "answer": p["answer"]},
        }
        for idx, p in enumerate(problems)
    ]


def write_parquet(out_dir: str | Path, train_size: int, test_size: int, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.parquet`` and ``test.parquet`` under ``out_dir``; returns their paths.

    Both splits are drawn from one stream of distinct problems, so no question appears in both.
    """
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = word_problems(train_size + test_size, seed)
    paths = (out / "train.parquet", out / "test.parquet")
    for path, split, chunk in ((paths[0], "train", problems[:train_size]), (paths[1], "test", problems[train_size:])):
        pd.DataFrame(to_rows(chunk, split)).to_parquet(path, index=False)
    return paths
