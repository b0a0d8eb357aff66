"""``verl-r3 bench startup``: what loading verl_r3 adds to every verl process's start.

verl imports the modules named in ``VERL_USE_EXTERNAL_MODULES`` during ``import verl`` in every
process it starts: the driver, the task runner and each Ray worker (actor, rollout server, agent
loop workers, reward workers, TransferQueue storage units, ...). This benchmark imports a module
(``verl`` by default) in fresh interpreters, alternating between the two sides:

- ``plain``: ``VERL_USE_EXTERNAL_MODULES`` unset;
- ``activated``: ``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate``.

Each child times its own import (``time.perf_counter`` around it, so interpreter start-up is left
out) and counts the modules it loaded. The figure is the ratio of the medians, activated / plain.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys

__all__ = ["ACTIVATE", "SIDES", "format_result", "run"]

ACTIVATE = "verl_r3.integration.activate"
SIDES = ("plain", "activated")


def _heavy() -> list[str]:
    """The verl modules activation registers or patches into once verl imports them (a process
    that needs them imports them anyway; activation alone must not), and ``peft``, which verl's
    engines pull in."""
    from verl_r3.integration.fsdp_cpu import ENGINE_MODULE
    from verl_r3.integration.hf_rollout import REPLICA_REGISTRY_MODULE, ROLLOUT_REGISTRY_MODULE
    from verl_r3.patches.verl_tool_agent_loop_0_9 import TARGET_MODULE

    return [ENGINE_MODULE, ROLLOUT_REGISTRY_MODULE, REPLICA_REGISTRY_MODULE, TARGET_MODULE, "peft"]


_CHILD = r"""
import json, sys, time
start = time.perf_counter()
__import__(sys.argv[1])
seconds = time.perf_counter() - start
print("STARTUP " + json.dumps({"seconds": seconds, "modules": len(sys.modules),
                               "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def _child_env(side: str, cpu_platform: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_MODULES", "VERL_PLATFORM")}
    if side == "activated":
        env["VERL_USE_EXTERNAL_MODULES"] = ACTIVATE
    if cpu_platform:
        env["VERL_PLATFORM"] = "cpu"
    return env


def _one(side: str, module: str, heavy: list[str], cpu_platform: bool, timeout_s: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, module, json.dumps(heavy)], env=_child_env(side, cpu_platform),
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STARTUP ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"importing {module} ({side}) failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("STARTUP "):])


def run(*, module: str = "verl", repeats: int = 5, cpu_platform: bool = False, timeout_s: float = 300) -> dict:
    """Import ``module`` ``repeats`` times per side (plus one warm-up pair), sides alternating."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from verl_r3.bench.capture import machine
    from verl_r3.patches._window import installed_version

    heavy = _heavy()
    runs = {side: [] for side in SIDES}
    last = {}
    for k in range(repeats + 1):  # the first pair warms the file cache
        order = SIDES if k % 2 == 0 else SIDES[::-1]
        for side in order:
            last[side] = _one(side, module, heavy, cpu_platform, timeout_s)
            if k:
                runs[side].append(last[side]["seconds"])
    medians = {side: statistics.median(runs[side]) for side in SIDES}
    return {"module": module, "cpu_platform": cpu_platform, "repeats": repeats,
            "seconds_plain": medians["plain"], "seconds_activated": medians["activated"],
            "ratio": medians["activated"] / medians["plain"],
            "plain_runs": runs["plain"], "activated_runs": runs["activated"],
            "modules_plain": last["plain"]["modules"], "modules_activated": last["activated"]["modules"],
            "heavy_plain": last["plain"]["heavy"], "heavy_activated": last["activated"]["heavy"],
            "machine": machine(python=platform.python_version(), verl=installed_version("verl"))}


def format_result(result: dict) -> str:
    lines = [
        f"verl-r3 bench startup: `import {result['module']}` in a fresh interpreter, without and with "
        f"VERL_USE_EXTERNAL_MODULES={ACTIVATE}" + (" (VERL_PLATFORM=cpu)" if result["cpu_platform"] else ""),
        "machine  " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
        f"repeats  {result['repeats']} (+1 warm-up pair), sides alternating; median seconds of the import:",
    ]
    for side in SIDES:
        runs = ", ".join(f"{x:.2f}" for x in result[f"{side}_runs"])
        heavy = ", ".join(result[f"heavy_{side}"]) or "none"
        lines.append(f"  {side:<10}{result[f'seconds_{side}']:7.2f} s  {result[f'modules_{side}']:5d} modules  "
                     f"engines/rollouts/agent loops loaded: {heavy}   runs: {runs}")
    lines.append(f"ratio    {result['ratio']:.3f} activated / plain")
    return "\n".join(lines)
