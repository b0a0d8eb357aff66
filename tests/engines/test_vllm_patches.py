"""The vLLM patches and the CPU-build alias in-process: windows, apply/revert, and what each changes."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import engine_harness as H  # noqa: E402
from patch_state import reverted  # noqa: E402

from verl_r3.integration import vllm_cpu  # noqa: E402

PATCHES = ["vllm_cpu_capture_0_32", "vllm_cpu_weight_sync_0_32"]


@pytest.fixture(params=PATCHES)
def patch_module(request):
    with reverted(importlib.import_module(f"verl_r3.patches.{request.param}")) as patch:
        yield patch


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_refuses_vllm_outside_its_window(patch_module, monkeypatch, version):
    monkeypatch.setattr(patch_module, "installed_vllm_version", lambda: version)
    with pytest.raises(RuntimeError, match=r">=0\.32\.0,<0\.33\.0") as err:
        patch_module.apply()
    assert version in str(err.value) and patch_module.NAME in str(err.value)
    assert not patch_module.is_applied()


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cpu", "0.32.4"])
def test_accepts_vllm_inside_its_window(patch_module, monkeypatch, version):
    monkeypatch.setattr(patch_module, "installed_vllm_version", lambda: version)
    assert patch_module.check_version() == version


def test_apply_and_revert_are_idempotent_and_restore_the_originals(patch_module):
    from vllm.config import VllmConfig
    from vllm.model_executor.layers import utils
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    names = [(VllmConfig, "_verify_aux_output_compatibility"), (CPUModelRunner, "initialize_kv_cache"),
             (CPUModelRunner, "execute_model"), (CPUModelRunner, "sample_tokens"),
             (utils, "dispatch_cpu_unquantized_gemm")]
    before = [(owner, name, vars(owner).get(name)) for owner, name in names]
    assert patch_module.apply() is True and patch_module.apply() is False and patch_module.is_applied()
    changed = [name for owner, name, was in before if vars(owner).get(name) is not was]
    assert changed  # each patch replaces something
    assert patch_module.revert() is True and patch_module.revert() is False
    assert [(owner, name, vars(owner).get(name)) for owner, name, _ in before] == before


def _engine_config(path, capture=True):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=path, dtype="float32", enforce_eager=True, max_model_len=128, block_size=32,
                      enable_return_routed_experts=capture).create_engine_config()


def test_the_entry_point_applies_the_capture_patch_and_without_it_vllm_refuses_capture_on_cpu():
    from vllm.plugins import load_general_plugins

    from verl_r3.patches import vllm_cpu_capture_0_32 as patch

    path, _, _ = H.model_dir()
    load_general_plugins()  # what vLLM does in each of its processes (once per process)
    assert patch.is_applied()
    with reverted(patch):
        with pytest.raises(ValueError, match="requires Model Runner V2"):
            _engine_config(path)
        patch.apply()
        config = _engine_config(path)
        assert config.aux_output_config.enable_return_routed_experts
        assert not config.use_v2_model_runner  # the CPU build's own runner, patched


def test_keep_weights_leaves_a_loadable_weight_after_cpu_packing():
    from vllm.model_executor.layers import utils

    from verl_r3.patches import vllm_cpu_weight_sync_0_32 as patch

    def packed_layer():
        layer = torch.nn.Linear(64, 64, bias=False)
        layer.weight.requires_grad_(False)
        utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
        return layer

    with reverted(patch):
        assert packed_layer().weight.numel() == 0  # vLLM's default: the weight is gone after packing
        patch.apply()
        layer = packed_layer()
        assert layer.weight.shape == (64, 64)
        x = torch.randn(3, 64)
        assert torch.allclose(layer.cpu_linear(x, layer.weight, None), x @ layer.weight.T, atol=1e-4)


def test_the_cpu_build_answers_to_the_name_vllm_with_a_cpu_suffix():
    cpu = importlib.metadata.version("vllm-cpu")
    version = vllm_cpu.install_version_alias()
    assert version == f"{cpu}+cpu"
    assert importlib.metadata.version("vllm") == version
    assert vllm_cpu.install_version_alias() == version  # idempotent: one finder
    assert sum(isinstance(f, vllm_cpu._AliasFinder) for f in sys.meta_path) == 1
    from vllm.platforms import vllm_version_matches_substr

    assert vllm_version_matches_substr("cpu")  # vLLM's own CPU detection still sees its build


def test_the_plugin_is_registered_and_reports_the_patch_path():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert "verl_r3.integration.vllm_cpu:plugin" in [ep.value for ep in points]
    path, reason = vllm_cpu.capture_path()
    assert path == "patch" and "vllm_cpu_capture_0_32" in reason


def _warm_model_dir():
    """The tiny model with weights far from vLLM's dummy init (scaled up), so a failed sync shows."""
    path, cfg, _ = H.model_dir()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8.0)
    model.save_pretrained(path)
    return path


def test_verls_weight_sync_into_vllm_on_cpu_reproduces_the_model_exactly():
    import json
    import subprocess

    path = _warm_model_dir()
    env = dict(os.environ, VERL_PLATFORM="cpu", VERL_USE_EXTERNAL_MODULES="verl_r3.integration.activate")
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "vllm_sync_driver.py"), path],
                          capture_output=True, text=True, timeout=300, env=env, start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["disk_gap"] < 1e-4 and r["dummy_gap"] > 0.1  # the check separates right from wrong weights
    assert r["differ"] == [], r["differ"]  # every parameter, experts' packed layout included
    assert r["synced_gap"] < 1e-4, r
