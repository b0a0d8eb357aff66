"""Every patch module refuses a verl outside its version window, naming the window and the version."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from patch_state import reverted  # noqa: E402

pytest.importorskip("verl")

PATCHES = ["verl_pg_backend_0_9", "verl_fsdp2_offload_cpu_0_9", "verl_tool_agent_loop_0_9", "verl_agent_loop_routing_0_9"]


@pytest.fixture(params=PATCHES)
def patch_module(request):
    with reverted(importlib.import_module(f"verl_r3.patches.{request.param}")) as patch:
        yield patch


@pytest.mark.parametrize("version", ["0.8.9", "0.10.0", "1.0.0"])
def test_refuses_verl_outside_its_window(patch_module, monkeypatch, version):
    monkeypatch.setattr(patch_module, "installed_verl_version", lambda: version)
    with pytest.raises(RuntimeError, match=r">=0\.9\.0,<0\.10\.0") as err:
        patch_module.apply()
    assert version in str(err.value) and patch_module.__name__.rsplit(".", 1)[1] in str(err.value)
    assert not patch_module.is_applied()


@pytest.mark.parametrize("version", ["0.9.0", "0.9.1", "0.9.3.dev0", "0.9.1+cpu"])
def test_accepts_verl_inside_its_window(patch_module, monkeypatch, version):
    monkeypatch.setattr(patch_module, "installed_verl_version", lambda: version)
    assert patch_module.check_version() == version


def test_refuses_when_verl_is_missing(patch_module, monkeypatch):
    monkeypatch.setattr(patch_module, "installed_verl_version", lambda: None)
    with pytest.raises(RuntimeError, match="verl is not installed"):
        patch_module.apply()
