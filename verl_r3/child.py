"""A child process under a wall-clock limit, killed with everything it started.

verl, Ray, vLLM and SGLang start processes of their own, and a failed worker can leave them
waiting forever. ``run_child`` starts the command in a new process group and, when it ends or
its time is up, kills that whole group, so nothing it started outlives the call and a hang ends
as a result (``timed_out``) instead of blocking the caller.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass

__all__ = ["ChildResult", "run_child"]


@dataclass(frozen=True)
class ChildResult:
    returncode: int | None  # None when the child ran past its limit
    stdout: str | bytes | None  # what it wrote to a pipe (None when stdout was not a pipe)
    stderr: str | bytes | None

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_child(cmd: list[str], *, timeout_s: float, **popen_kw) -> ChildResult:
    """Run ``cmd`` (``subprocess.Popen`` keywords in ``popen_kw``: ``stdout``, ``env``, ...) for at
    most ``timeout_s`` seconds, then kill its process group; returns its exit code and output."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        out = err = None
        code = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return ChildResult(code, out, err)
