"""``VERL_USE_EXTERNAL_MODULES=verl_r3.integration.activate`` loads verl_r3 during ``import verl``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl")

_PROBE = r"""
import json
import verl  # imports the modules in VERL_USE_EXTERNAL_MODULES
from verl.utils.device import get_device_name
from verl.workers.engine import EngineRegistry
from verl.workers.engine.base import EngineRegistry as Registry
keys = {str(k): v.__name__ for k, v in Registry._engines["language_model"]["fsdp2"].items()}
print("RESULT " + json.dumps({"device": get_device_name(), "keys": keys,
                              "picked": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__}))
"""


def _probe(platform: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env.update({"VERL_USE_EXTERNAL_MODULES": "verl_r3.integration.activate", "VERL_USE_EXTERNAL_PLUGINS": "none"})
    if platform:
        env["VERL_PLATFORM"] = platform
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_activation_on_the_cpu_platform_picks_the_replay_engine():
    out = _probe("cpu")
    assert out["device"] == "cpu"
    assert out["keys"]["cpu"] == "FSDPEngineWithLMHead"  # verl's engine, made available on cpu
    assert out["keys"]["('cpu', 'cpu')"] == "FSDPReplayEngine"
    assert out["picked"] == "FSDPReplayEngine"


def test_activation_without_the_cpu_platform_registers_no_cpu_engine():
    out = _probe(None)
    assert out["device"] != "cpu"
    assert "cpu" not in out["keys"]  # verl's own detection and registry, plus the vendor keys
    assert out["keys"]["('cuda', 'nvidia')"] == "FSDPReplayEngine"
    assert out["keys"]["cuda"] == "FSDPEngineWithLMHead"
