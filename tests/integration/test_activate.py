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


_LAZY_PROBE = r"""
import json
import sys
import verl  # imports verl_r3.integration.activate

heavy = ["verl.workers.engine", "verl.workers.rollout.base", "verl.workers.rollout.replica",
         "verl.experimental.agent_loop.tool_agent_loop", "peft"]
before = [name for name in heavy if name in sys.modules]
from verl_r3.patches import verl_tool_agent_loop_0_9 as tool_patch
applied_before = tool_patch.is_applied()
from verl_r3.integration.fsdp_replay import replay_engine_class
engine = replay_engine_class()  # imports verl's engine, which registers ours: one class either way
from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.workers.engine.base import EngineRegistry
print("RESULT " + json.dumps({
    "imported_by_activation": before, "tool_patch_before": applied_before, "tool_patch_after": tool_patch.is_applied(),
    "hf_worker": _ROLLOUT_REGISTRY.get(("hf", "async")), "hf_replica": "hf" in RolloutReplicaRegistry._registry,
    "picked": EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__,
    "picked_is_built": EngineRegistry.get_engine_cls("language_model", "fsdp2") is engine is replay_engine_class()}))
"""


def test_activation_imports_no_engine_rollout_or_agent_loop_and_registers_when_verl_does():
    """A process that never loads verl's engines, rollouts or agent loops (a reward worker, a
    storage unit) does not import them for verl_r3; once verl imports one, it is registered or patched."""
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    env.update({"VERL_USE_EXTERNAL_MODULES": "verl_r3.integration.activate", "VERL_USE_EXTERNAL_PLUGINS": "none",
                "VERL_PLATFORM": "cpu"})
    proc = subprocess.run([sys.executable, "-c", _LAZY_PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])
    assert out["imported_by_activation"] == []
    assert (out["tool_patch_before"], out["tool_patch_after"]) == (False, True)
    assert out["hf_worker"] == "verl_r3.integration.hf_rollout.HFRolloutAdapter" and out["hf_replica"]
    assert out["picked"] == "FSDPReplayEngine" and out["picked_is_built"]
