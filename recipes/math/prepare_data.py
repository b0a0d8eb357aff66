"""Math data in verl's parquet format: DATA_DIR/train.parquet and DATA_DIR/test.parquet.

    python recipes/math/prepare_data.py --out ~/data/verl_r3/math                 # DAPO-Math-17k; AIME24/25, AMC23, MATH-500
    python recipes/math/prepare_data.py --out DIR --train gsm8k,math --test gsm8k,math500
    python recipes/math/prepare_data.py --out DIR --smoke                           # offline: reasoning-gym, small

Sources (``--train`` / ``--test``, comma-separated; hub ids as verl's and the paper family's
preprocessing use them):

- ``dapo``: BytedTsinghua-SIA/DAPO-Math-17k (train), integer answers (its ~1.79M rows hold about 17k
  problems, each repeated; repeats are left out and counted);
- ``gsm8k``: openai/gsm8k ``main`` (train / test), the answer after ``####``;
- ``math``: DigitalLearningGmbH/MATH-lighteval (train / test), the last ``\\boxed{}`` of the solution;
- ``math500``: HuggingFaceH4/MATH-500 (test); ``aime24``: HuggingFaceH4/aime_2024 (test);
  ``aime25``: math-ai/aime25 (test); ``amc23``: math-ai/amc23 (test);
- ``reasoning_gym``: generated offline by reasoning-gym (arithmetic and GSM-style templates), for
  ``--smoke`` and for machines without the hub.

Every prompt is one user message: the problem, then the instruction to reason step by step and
put the final answer in ``\\boxed{}`` (what ``reward.py`` reads). The test file holds every test
source, told apart by ``data_source`` (verl reports validation scores per data source).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from verl_r3.argtypes import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from verl_rows import load_hub, verl_row, write_splits  # noqa: E402

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

#: Lines DAPO-Math-17k wraps around each problem (its prompts ask for "Answer: ..."; ours for \boxed{}).
_DAPO_HEAD = re.compile(r"^Solve the following math problem step by step\..*?\n\n", re.S)
_DAPO_TAIL = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


def user_prompt(problem: str) -> list[dict]:
    return [{"role": "user", "content": f"{problem.strip()}\n\n{INSTRUCTION}"}]


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` of ``text`` (braces matched), or None."""
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


# ---- one converter per source: hub row -> (problem, answer, extra) or None to skip ----

def from_gsm8k(row: dict):
    answer = row["answer"].split("####")[-1].strip().replace(",", "")
    return row["question"], answer, {}


def from_math(row: dict):
    answer = last_boxed(row["solution"])
    return (row["problem"], answer, {"level": row.get("level"), "type": row.get("type")}) if answer else None


def from_math500(row: dict):
    return row["problem"], str(row["answer"]), {"level": row.get("level"), "subject": row.get("subject")}


def _answer_text(value) -> str:
    """A hub answer as text: 27.0 (math-ai/amc23 stores floats) -> "27"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def from_problem_answer(row: dict):
    problem = row.get("problem", row.get("question"))
    return problem, _answer_text(row["answer"]), {}


def from_dapo(row: dict):
    content = row["prompt"][0]["content"]
    problem = _DAPO_TAIL.sub("", _DAPO_HEAD.sub("", content, count=1))
    return problem, str(row["reward_model"]["ground_truth"]), {}


#: name -> {split: (hub id, config, hub split)}, converter
HUB: dict[str, tuple[dict[str, tuple[str, str | None, str]], Callable]] = {
    "dapo": ({"train": ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")}, from_dapo),
    "gsm8k": ({"train": ("openai/gsm8k", "main", "train"), "test": ("openai/gsm8k", "main", "test")}, from_gsm8k),
    "math": ({"train": ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
              "test": ("DigitalLearningGmbH/MATH-lighteval", None, "test")}, from_math),
    "math500": ({"test": ("HuggingFaceH4/MATH-500", None, "test")}, from_math500),
    "aime24": ({"test": ("HuggingFaceH4/aime_2024", None, "train")}, from_problem_answer),
    "aime25": ({"test": ("math-ai/aime25", None, "test")}, from_problem_answer),
    "amc23": ({"test": ("math-ai/amc23", None, "test")}, from_problem_answer),
}

#: reasoning-gym tasks of the offline source; --smoke keeps the short ones (its model reads a token per byte)
GYM_TASKS = ("basic_arithmetic", "gsm_symbolic")
SMOKE_TASKS = ("basic_arithmetic",)


def gym_problems(size: int, seed: int, tasks: Iterable[str] = GYM_TASKS) -> list[tuple[str, str, dict]]:
    """``size`` problems from reasoning-gym, spread over ``tasks``, the same for the same seed."""
    import reasoning_gym

    tasks = list(tasks)
    out = []
    for k, task in enumerate(tasks):
        n = size // len(tasks) + (1 if k < size % len(tasks) else 0)
        if n:
            for item in reasoning_gym.create_dataset(task, size=n, seed=seed + 1000 * k):
                out.append((item["question"], str(item["answer"]), {"task": task}))
    return out


#: reasoning-gym seeds item i of a dataset with seed + i: the test split's seeds start this far
#: above the train split's, so the two never share a seed (train sizes stay far below it).
GYM_TEST_SEED_OFFSET = 1_000_000


def _gym_split(split: str, size: int, seed: int, tasks: Iterable[str], train_size: int) -> list:
    if split == "train":
        return gym_problems(size, seed, tasks)
    train = {problem for problem, _, _ in gym_problems(train_size, seed, tasks)}
    items = gym_problems(size, seed + GYM_TEST_SEED_OFFSET, tasks)
    kept = [item for item in items if item[0] not in train]  # equal text from different seeds
    if len(kept) < len(items):
        print(f"reasoning_gym test: left out {len(items) - len(kept)} problems also in the train split",
              file=sys.stderr)
    return kept


def rows_for(name: str, split: str, *, limit: int | None, seed: int, smoke: bool = False,
             train_limit: int | None = None) -> list[dict]:
    """Rows of one source and split; ``train_limit`` is the train split's ``limit`` (the generated
    test split leaves out problems of that train split)."""
    if name == "reasoning_gym":
        items = _gym_split(split, limit or (512 if split == "train" else 64), seed,
                           SMOKE_TASKS if smoke else GYM_TASKS, train_limit or 512)
        source = "reasoning_gym"
    else:
        if name not in HUB:
            raise SystemExit(f"unknown source {name!r}; one of {', '.join([*HUB, 'reasoning_gym'])}")
        splits, convert = HUB[name]
        if split not in splits:
            raise SystemExit(f"source {name!r} has no {split} split here (it has: {', '.join(splits)})")
        hub_id, config, hub_split = splits[split]
        data = load_hub(hub_id, config=config, split=hub_split)
        items, seen, repeats = [], set(), 0
        for x in (convert(r) for r in data):
            if x is None:
                continue
            if x[0] in seen:  # DAPO-Math-17k holds each of its ~17k problems about 100 times
                repeats += 1
                continue
            seen.add(x[0])
            items.append(x)
        if repeats:
            print(f"{hub_id} {split}: left out {repeats} repeated problems", file=sys.stderr)
        source = hub_id
        if limit:
            items = items[:limit]
    return [verl_row(source, user_prompt(problem), answer, ability="math", split=split, index=i,
                     extra={"problem": problem, "answer": answer, **{k: v for k, v in extra.items() if v is not None}})
            for i, (problem, answer, extra) in enumerate(items)]


def sources_help() -> str:
    """The sources ``--train`` / ``--test`` take, with their hub ids and splits (``--help``'s epilog)."""
    lines = ["sources (--train / --test, comma-separated):"]
    for name, (splits, _) in HUB.items():
        hub_ids = ", ".join(dict.fromkeys(hub_id for hub_id, _, _ in splits.values()))
        lines.append(f"  {name:<14} {hub_ids} ({' / '.join(splits)})")
    lines.append(f"  {'reasoning_gym':<14} generated offline by reasoning-gym, no hub (train / test)")
    return "\n".join(lines)


def main(argv=None, *, as_row: Callable[[dict], dict] = lambda row: row, description: str | None = None) -> int:
    """The command line; the agent recipe's prepare_data.py runs it with its own ``as_row``."""
    p = argparse.ArgumentParser(description=description or __doc__.split("\n\n")[0], epilog=sources_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="DATA_DIR: train.parquet and test.parquet go here")
    p.add_argument("--train", default="dapo", help="comma-separated train sources")
    p.add_argument("--test", default="aime24,aime25,amc23,math500", help="comma-separated test sources")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many rows per source")
    p.add_argument("--seed", type=int, default=0, help="for the generated source")
    p.add_argument("--smoke", action="store_true", help="offline and small: reasoning_gym, 64 train / 16 test")
    args = p.parse_args(argv)
    if args.smoke:
        args.train, args.test = "reasoning_gym", "reasoning_gym"

    train_limit = args.limit or 64 if args.smoke else args.limit

    def rows(name: str, split: str) -> list[dict]:
        limit = (16 if split == "test" else train_limit) if args.smoke else args.limit
        return [as_row(row) for row in rows_for(name, split, limit=limit, seed=args.seed, smoke=args.smoke,
                                                train_limit=train_limit)]

    return write_splits(args.out, {"train": args.train, "test": args.test}, rows)

if __name__ == "__main__":
    sys.exit(main())
