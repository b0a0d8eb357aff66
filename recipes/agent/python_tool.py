"""The agent recipe's tool: ``python(code)`` runs a program in verl_r3's sandbox and returns its output.

verl loads this file in every agent-loop worker (``actor_rollout_ref.rollout.multi_turn.
function_tool_path``; recipe.sh sets it) and offers the tool to the model through the chat
template. Each call is one ``verl_r3.sandbox.run_python``: no network, no access to the trainer's
files or environment, the standard library only, and limits on wall time, memory, processes and
output (``LIMITS``; README "Sandbox"). A failure of the program (an exception, a timeout) is the
tool's answer, which the model reads on its next turn; a sandbox that cannot be built raises,
and verl reports that as the tool's error instead of running the code unsandboxed.
"""

from __future__ import annotations

from verl.tools.function_tool import function_tool

from verl_r3.sandbox import run_python

#: One call's limits: wall seconds, memory (MB), processes, bytes kept per output stream.
LIMITS = {"timeout_s": 10.0, "memory_mb": 512, "max_processes": 8, "max_output_bytes": 16384}


def format_result(res) -> str:
    """What the model reads back: stdout, then stderr, then why the program was stopped, if it was."""
    parts = [res.stdout.rstrip("\n")] if res.stdout.strip() else []
    if res.stderr.strip():
        parts.append("stderr:\n" + res.stderr.rstrip("\n"))
    if res.reason == "timeout" or res.reason == "cpu_time":
        parts.append(f"(stopped: the program ran over {LIMITS['timeout_s']:g} s)")
    elif res.reason == "memory":
        parts.append(f"(stopped: the program used over {LIMITS['memory_mb']} MB)")
    elif res.reason == "output_limit":
        parts.append("(stopped: too much output)")
    elif res.returncode != 0:
        parts.append(f"(exit status {res.returncode})")
    return "\n".join(parts) if parts else "(no output: print() the values you need)"


@function_tool("python")
def python(code: str) -> str:
    """Run a Python 3 program and return what it printed. Use it for calculations; print() the results.

    Args:
        code: A complete Python 3 program (standard library only).
    """
    return format_result(run_python(code, timeout_s=LIMITS["timeout_s"], memory_mb=LIMITS["memory_mb"],
                                    max_processes=LIMITS["max_processes"],
                                    max_output_bytes=LIMITS["max_output_bytes"], site_packages=False))
