"""Math reward for verl: the response's final answer checked against the ground truth with math-verify.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)`` (set
``reward.custom_reward_function.path`` to this file, ``.name`` to ``compute_score``; the run
scripts do). The answer is the last ``\\boxed{...}`` of the response, else the text after the last
``Answer:``; the ground truth is a bare answer (``72``, ``\\frac{1}{2}``, ``x^2+1``). The two are
compared by math-verify (symbolic and numeric equality: ``0.5`` equals ``\\frac{1}{2}``).

Returns a dict, which verl's reward managers log beside the score: ``score`` (1.0 or 0.0),
``acc`` (the same, as verl's DAPO recipes name it), ``has_answer`` (an answer was found) and
``timed_out`` (math-verify took longer than ``TIMEOUT_S``; the score is then 0.0 and a warning
is logged, the one fallback).

math-verify bounds its own work with ``signal.alarm``, which only works in a process's main
thread, and verl calls reward functions from worker threads. Every check therefore runs in a
helper process (one per reward process, started on first use) whose main thread does the work;
a check that does not answer within ``TIMEOUT_S`` gets the helper killed and restarted.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from typing import Any

__all__ = ["TIMEOUT_S", "compute_score", "extract_answer", "is_equivalent"]

logger = logging.getLogger(__name__)

#: Seconds one check may take (parsing both sides and comparing) before it scores 0.
TIMEOUT_S = float(os.environ.get("R3_MATH_VERIFY_TIMEOUT_S", "10"))

_MAX_ANSWER_CHARS = 1000  # a longer "answer" is not one; math-verify would only spend time on it

_WORKER = r"""
import json, sys
from math_verify import LatexExtractionConfig, ExprExtractionConfig, parse, verify

GOLD = (LatexExtractionConfig(), ExprExtractionConfig())
for line in sys.stdin:
    gold, answer = json.loads(line)
    try:
        g = parse("$" + gold + "$", GOLD, parsing_timeout=5)
        a = parse("$" + answer + "$", GOLD, parsing_timeout=5)
        ok = bool(g) and bool(a) and verify(g, a, timeout_seconds=5)
        if not ok:  # plain strings ("yes", "B"): math-verify parses them to nothing
            ok = gold.strip() == answer.strip()
    except Exception:
        ok = False
    sys.stdout.write(json.dumps(bool(ok)) + "\n")
    sys.stdout.flush()
"""


class _Checker:
    """One helper process answering ``[gold, answer]`` lines with ``true``/``false``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._warm = False  # the running helper has answered once (sympy imported)

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def check(self, gold: str, answer: str, timeout_s: float) -> bool | None:
        """True / False, or None when the helper did not answer within ``timeout_s``."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc, self._warm = self._start(), False
            proc = self._proc
            proc.stdin.write(json.dumps([gold, answer]) + "\n")
            proc.stdin.flush()
            box: list[str] = []
            reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
            reader.start()
            # the first check also waits for the helper to import sympy (a few seconds)
            reader.join(timeout_s + (0.0 if self._warm else 30.0))
            if not box or not box[0]:
                self._stop()  # hung or crashed: the next check starts a fresh helper
                return None
            self._warm = True
            return json.loads(box[0])


_CHECKER = _Checker()


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if there is none."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _bare(answer: str) -> str:
    """``answer`` without the markup around it: "** 42**" -> "42", "$\\frac{1}{2}$." -> "\\frac{1}{2}"."""
    previous = None
    while previous != answer:
        previous, answer = answer, answer.strip().strip("*").strip().rstrip(".").strip("$")
    return answer


def extract_answer(text: Any) -> str | None:
    """The final answer of a response: its last ``\\boxed{}``, else what follows its last ``Answer:``."""
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    if boxed is None:
        found = re.findall(r"(?im)^\s*\**answer\**\s*[:：]\s*(.+?)\s*$", text)
        boxed = _bare(found[-1]) if found else None
    if boxed is None or not boxed.strip() or len(boxed) > _MAX_ANSWER_CHARS:
        return None
    return boxed.strip()


def is_equivalent(gold: str, answer: str, timeout_s: float | None = None) -> bool | None:
    """math-verify equality of two bare answers (within ``timeout_s``, default ``TIMEOUT_S``); None when it timed out."""
    return _CHECKER.check(str(gold), str(answer), TIMEOUT_S if timeout_s is None else timeout_s)


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict:
    """Score one response (verl's custom reward signature); see the module docstring."""
    answer = extract_answer(solution_str)
    result = {"score": 0.0, "acc": 0.0, "has_answer": float(answer is not None), "timed_out": 0.0}
    if answer is None or ground_truth is None or not str(ground_truth).strip():
        return result
    same = is_equivalent(str(ground_truth).strip(), answer)
    if same is None:
        index = (extra_info or {}).get("index") if isinstance(extra_info, dict) else None
        logger.warning("math reward: math-verify took over %.0f s on sample %s of %s (answer %r); scored 0",
                       TIMEOUT_S, index, data_source, answer[:80])
        result["timed_out"] = 1.0
        return result
    result["score"] = result["acc"] = float(same)
    return result
