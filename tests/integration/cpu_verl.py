"""Run a script in a fresh interpreter with verl on the CPU platform (parent side of the tests).

The child gets the CPU platform (VERL_USE_EXTERNAL_MODULES, VERL_PLATFORM=cpu), a loopback
world-size-1 process group environment, this folder (for engine_harness) and ``paths`` on
PYTHONPATH, and
the case parameters as JSON in CASE; it prints one line "RESULT <json>".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cpu_verl(body: str, case: dict, timeout_s: int = 300, paths: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env.update({
        "VERL_USE_EXTERNAL_MODULES": "verl_r3.integration.cpu_platform", "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_PLUGINS": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "CASE": json.dumps(case),
        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([HERE, *paths, env.get("PYTHONPATH", "")]),
    })
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(body)], env=env, capture_output=True, text=True,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no RESULT line:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def ppo_inputs(root, reward_source: str) -> tuple:
    """What a ``main_ppo`` test run reads, written under ``root``: the quickstart's tiny model (no
    warm start), 64 training and 8 test prompts, and a reward file holding ``reward_source``.
    Returns (root, model_dir, train_file, val_file, reward_file)."""
    from verl_r3.quickstart import data, model

    model.build_model_dir(root / "model", warm_start_steps=0, log=None)
    train, val = data.write_parquet(root / "data", train_size=64, test_size=8, seed=0)
    reward = root / "reward.py"
    reward.write_text(reward_source)
    return root, str(root / "model"), str(train), str(val), str(reward)
