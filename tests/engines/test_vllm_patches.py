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


# -- the capture patch's step path: per-layer capture and one packed output per step --------------
def _native_capturer(layers=3, top_k=2, dtype="uint8"):
    from types import SimpleNamespace

    return SimpleNamespace(shape_per_token=(layers, top_k), output_dtype_name=dtype, output_dtype=getattr(torch, dtype))


def test_step_capturer_stacks_the_layers_of_one_forward_and_gives_dense_layers_zero_rows():
    from verl_r3.patches.vllm_cpu_capture_0_32 import StepCapturer

    cap = StepCapturer(_native_capturer())
    ids0 = torch.tensor([[1, 7], [3, 2], [0, 5], [6, 4], [9, 9]], dtype=torch.int32)
    ids2 = torch.tensor([[200, 4], [5, 1], [2, 3], [7, 0], [9, 9]], dtype=torch.int64)
    cap.capture(0, ids0)
    cap.capture(2, ids2)  # layer 1 is dense: never routes
    rows = cap.snapshot_routing_data(4)  # the fifth row is padding past the step's tokens
    assert rows.shape == (4, 3, 2) and rows.dtype == torch.uint8
    assert torch.equal(rows[:, 0], ids0[:4].to(torch.uint8)) and torch.equal(rows[:, 2], ids2[:4].to(torch.uint8))
    assert torch.equal(rows[:, 1], torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="no MoE layer routed"):
        cap.snapshot_routing_data(4)  # each step starts empty: nothing of the last forward is reused
    cap.capture(0, ids0[:2])
    with pytest.raises(RuntimeError, match=r"layers \[0\] routed fewer than the step's 4 tokens"):
        cap.snapshot_routing_data(4)
    with pytest.raises(IndexError, match="layer 3 is outside the model's 3 layers"):
        cap.capture(3, ids0)


def test_step_routing_pickles_as_one_array_and_reads_like_vllms_dict():
    import pickle

    import numpy as np
    from vllm.distributed.aux_output_connector.connector import AuxRequestOutput

    from verl_r3.patches.vllm_cpu_capture_0_32 import StepRouting

    rng = np.random.default_rng(0)
    outputs = {f"req-{i}": AuxRequestOutput(10 * i, rng.integers(0, 8, (n, 4, 2), dtype=np.uint8))
               for i, n in enumerate([1, 1, 37, 1, 5])}
    packed = StepRouting.pack(outputs)
    wire = pickle.dumps(packed, protocol=pickle.HIGHEST_PROTOCOL)
    back = pickle.loads(wire)
    assert list(back) == list(outputs) and len(back) == 5 and "req-2" in back and "req-9" not in back
    for rid, want in outputs.items():
        got = back[rid]
        assert got.token_start == want.token_start and np.array_equal(got.rows, want.rows)
    assert len(wire) < len(pickle.dumps(outputs, protocol=pickle.HIGHEST_PROTOCOL))
    with pytest.raises(KeyError):
        back["req-9"]
    frozen = packed.rows.copy()
    frozen.flags.writeable = False  # as received zero-copy from shared memory
    owned = StepRouting(packed.ids, packed.starts, packed.bounds, frozen)
    assert owned.rows.flags.writeable and np.array_equal(owned.rows, frozen)
    assert len(StepRouting.pack({})) == 0


CAPTURER_PROBE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, block_size=32,
          enable_prefix_caching=True, enable_return_routed_experts=True, seed=0)
runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
out = llm.generate([{"prompt_token_ids": [5, 9, 14, 3]}], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
c = out[0].outputs[0]
print("RESULT " + json.dumps({"capturer": type(runner._verl_r3_routing_connector._capturer).__name__,
                              "tokens": list(c.token_ids), "routing": c.routed_experts.tolist()}))
"""


def test_the_engine_captures_through_the_per_layer_capturer():
    """In a real engine (in one process, to reach its runner) the routers are bound to StepCapturer,
    and its rows equal transformers' routing of the same tokens (the concurrent, preempted and
    prefix-cached cases run through the same path in test_vllm_capture.py)."""
    import json
    import subprocess

    from transformers import AutoModelForCausalLM

    from verl_r3 import RouterReplay

    path, _, _ = H.model_dir()
    proc = subprocess.run([sys.executable, "-c", CAPTURER_PROBE, path], capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["capturer"] == "StepCapturer"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rr = RouterReplay(model)
    ids = [5, 9, 14, 3] + result["tokens"]
    with torch.no_grad(), rr.record() as handle:
        model(torch.tensor([ids[:-1]]))
    want = handle.routed_experts[0].sort(-1).values
    got = torch.tensor(result["routing"]).sort(-1).values
    assert got.shape == want.shape == (len(ids) - 1, model.config.num_hidden_layers, model.config.num_experts_per_tok)
    for layer in rr.moe_layers:
        assert torch.equal(got[:, layer], want[:, layer].to(got.dtype)), layer
