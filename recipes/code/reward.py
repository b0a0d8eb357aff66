"""Code reward for verl: the fraction of a problem's unit tests the generated program passes.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)``. The
program is the response's last fenced code block (```` ```python ... ``` ````), else the whole
response. Every run happens in ``verl_r3.sandbox.run_python`` (no network, no access to the
caller's files or environment, limits on time, memory, processes and output; README "Sandbox"),
with the standard library only. ``ground_truth`` is the JSON string ``prepare_data.py`` writes, in
one of two forms:

- ``{"format": "asserts", "prompt_code": str, "preamble": str, "tests": [str, ...],
  "entry_point": str | null}`` (HumanEval, MBPP, call-based TACO problems): the sandbox runs
  ``prompt_code`` + the program (HumanEval's prompt holds the signature and helper functions; a
  full ``def`` in the response replaces its stub), then ``preamble`` (the test file's imports and
  constants, ``candidate = entry_point``), then each test in turn; a test passes when it
  completes (its assertions hold). One sandbox call per response.
- ``{"format": "stdio", "tests": [{"input": str, "output": str}, ...]}`` (standard-input
  problems): one sandbox call per test, passed when the program exits with 0 and its output
  equals the expected one, line by line with trailing whitespace ignored.

Returns a dict: ``score`` = passed / total (0.0 when the program does not load), ``passed``,
``total``, ``has_code`` (a fenced block was found) and ``timed_out`` (a run hit its time limit).

Reward hacking the harness closes: ``sys.exit(0)``, ``os._exit(0)`` or ``quit()`` before or
inside a test ends the run, and every test not yet reported counts as failed; printing a fake
report does not count either, since reports carry a random per-call token the program never
sees (it is read from standard input before the program is loaded, and the program's own
standard input is empty). Left open: a program that deliberately inspects the harness's memory
for that token, or returns objects whose ``__eq__`` always answers True.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from verl_r3.sandbox import run_python

__all__ = ["LIMITS", "HARNESS", "compute_score", "extract_code", "run_asserts", "run_stdio"]

#: Sandbox limits of one call: wall seconds (the whole test list for ``asserts``, one test for
#: ``stdio``), memory, processes, output bytes. Tests beyond ``max_tests`` are not run (and not counted).
LIMITS = {"asserts_timeout_s": 20.0, "stdio_timeout_s": 6.0, "memory_mb": 1024, "max_processes": 16,
          "max_output_bytes": 1 << 20, "max_tests": 32}

#: The program the sandbox runs for the ``asserts`` form; its input is one JSON line.
HARNESS = r'''
import json, os, signal, sys


class _TestTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _TestTimeout()


# Everything the harness calls after the program has loaded is bound here, before it loads: the
# program may rebind builtins (exec, compile, int, BaseException, ...) or the signal module's functions.
# Returns 1 (completed), 0 (raised: an assertion, an error, SystemExit) or 2 (stopped by its alarm).
def _run(source, name, env, seconds, _exec=exec, _compile=compile, _catch=BaseException, _timeout=_TestTimeout,
         _signal=signal.signal, _setitimer=signal.setitimer, _itimer=signal.ITIMER_REAL, _sigalrm=signal.SIGALRM,
         _handler=_alarm):
    _signal(_sigalrm, _handler)
    _setitimer(_itimer, seconds)
    try:
        _exec(_compile(source, name, "exec"), env)
        return 1
    except _timeout:
        return 2
    except _catch:
        return 0
    finally:
        _setitimer(_itimer, 0)


def _main(_range=range, _len=len):  # locals only: nothing of the job is reachable as a module attribute
    job = json.loads(sys.stdin.readline())
    token, seconds = job.pop("token"), job["test_timeout_s"]
    report = os.fdopen(os.dup(1), "w")  # kept aside: the program may close or replace sys.stdout
    write, flush, tests = report.write, report.flush, job["tests"]
    sys.stdin = open(os.devnull)
    env = {"__name__": "__main__"}
    loaded = _run(job["program"], "solution.py", env, seconds)
    if loaded == 1:
        loaded = _run(job["preamble"], "preamble.py", env, seconds)
    write(token + " loaded %d\n" % loaded)
    flush()
    if loaded == 1:
        for i in _range(_len(tests)):
            write(token + " test %d %d\n" % (i, _run(tests[i], "test_%d.py" % i, env, seconds)))
            flush()


_main()
'''

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(text: Any) -> tuple[str, bool]:
    """(program, fenced): the last fenced block (preferring Python-tagged ones), else the whole text."""
    if not isinstance(text, str):
        return "", False
    blocks = _FENCE.findall(text)
    if not blocks:
        return text, False
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    return (python or [body for _, body in blocks])[-1], True


def _joined(prompt_code: str, program: str) -> str:
    if not prompt_code:
        return program
    sep = "" if prompt_code.endswith("\n") else "\n"
    return prompt_code + sep + program


def run_asserts(program: str, spec: dict) -> dict:
    """Run the ``asserts`` form; returns ``{"passed", "total", "timed_out"}``."""
    tests = list(spec["tests"])[: LIMITS["max_tests"]]
    token = secrets.token_hex(16)
    job = {"token": token, "program": _joined(spec.get("prompt_code") or "", program),
           "preamble": spec.get("preamble") or "", "tests": tests,
           "test_timeout_s": max(1.0, LIMITS["asserts_timeout_s"] / max(1, len(tests)))}
    res = run_python(HARNESS, stdin=json.dumps(job) + "\n", timeout_s=LIMITS["asserts_timeout_s"] + 2,
                     memory_mb=LIMITS["memory_mb"], max_processes=LIMITS["max_processes"],
                     max_output_bytes=LIMITS["max_output_bytes"], site_packages=False)
    passed, timed_out = set(), res.timed_out
    for line in res.stdout.splitlines():
        parts = line.split()
        if not parts or parts[0] != token:
            continue
        timed_out |= parts[-1] == "2"  # the program (loaded) or a test (test i) stopped by its own alarm
        if len(parts) == 4 and parts[1] == "test" and parts[3] == "1":
            passed.add(int(parts[2]))
    return {"passed": len(passed), "total": len(tests), "timed_out": timed_out}


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def run_stdio(program: str, spec: dict) -> dict:
    """Run the ``stdio`` form, one sandbox call per test; returns ``{"passed", "total", "timed_out"}``."""
    tests = list(spec["tests"])[: LIMITS["max_tests"]]
    passed, timed_out = 0, False
    for test in tests:
        res = run_python(program, stdin=test["input"], timeout_s=LIMITS["stdio_timeout_s"],
                         memory_mb=LIMITS["memory_mb"], max_processes=LIMITS["max_processes"],
                         max_output_bytes=LIMITS["max_output_bytes"], site_packages=False)
        timed_out |= res.timed_out
        passed += int(res.returncode == 0 and not res.truncated and _lines(res.stdout) == _lines(test["output"]))
    return {"passed": passed, "total": len(tests), "timed_out": timed_out}


def parse_ground_truth(ground_truth: Any) -> dict:
    """The test spec of a row; ``ValueError`` naming what is wrong (a data preparation bug, never the model's)."""
    try:
        spec = json.loads(ground_truth) if isinstance(ground_truth, str) else dict(ground_truth)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"code reward: ground truth is not a JSON test spec ({exc}): {str(ground_truth)[:200]!r}")
    if not isinstance(spec, dict):
        raise ValueError(f"code reward: ground truth is JSON but not an object (a {type(spec).__name__}): "
                         f"{str(ground_truth)[:200]!r}")
    if spec.get("format") not in ("asserts", "stdio") or not spec.get("tests"):
        raise ValueError(f"code reward: test spec needs format 'asserts' or 'stdio' and at least one test, got "
                         f"format={spec.get('format')!r} with {len(spec.get('tests') or [])} tests")
    return spec


def compute_score(data_source: Any, solution_str: Any, ground_truth: Any, extra_info: Any = None,
                  **kwargs: Any) -> dict:
    """Score one response (verl's custom reward signature); see the module docstring."""
    spec = parse_ground_truth(ground_truth)
    program, fenced = extract_code(solution_str)
    if not program.strip():
        total = min(len(spec["tests"]), LIMITS["max_tests"])
        return {"score": 0.0, "passed": 0, "total": total, "has_code": float(fenced), "timed_out": 0.0}
    result = run_asserts(program, spec) if spec["format"] == "asserts" else run_stdio(program, spec)
    return {"score": result["passed"] / result["total"], "passed": result["passed"], "total": result["total"],
            "has_code": float(fenced), "timed_out": float(result["timed_out"])}
