"""The vLLM patches and the CPU-build alias in-process: windows, apply/revert, and what each changes."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import tempfile

import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import engine_harness as H  # noqa: E402
from patch_state import reverted  # noqa: E402

from verl_r3.integration import vllm_cpu  # noqa: E402
from family_models import save_family_model  # noqa: E402

PATCHES = ["vllm_cpu_capture_0_32", "vllm_cpu_weight_sync_0_32", "vllm_front_end_routing_0_32"]


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
    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector
    from vllm.model_executor.layers import utils
    from vllm.v1.engine.output_processor import RequestState
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    names = [(RequestState, "__init__"), (VllmConfig, "_verify_aux_output_compatibility"), (CPUModelRunner, "initialize_kv_cache"),
             (CPUModelRunner, "execute_model"), (CPUModelRunner, "sample_tokens"),
             (AuxOutputSchedulerConnector, "take_output"), (AuxOutputSchedulerConnector, "build_connector_meta"),
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


def test_capture_on_latent_attention_without_prefix_caching_says_why(monkeypatch):
    """vLLM's CPU platform turns prefix caching off for latent attention outside its AMX backend
    (here: CPU_MLA asked for); capture then refuses, naming the cause, not just the missing cache."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    from verl_r3.patches import vllm_cpu_capture_0_32 as patch

    path = tempfile.mkdtemp()
    save_family_model("deepseek_v3", path, hidden_size=128, kv_lora_rank=512, qk_rope_head_dim=64)
    load_general_plugins()
    assert patch.is_applied()

    def config(capture):
        return EngineArgs(model=path, dtype="float32", enforce_eager=True, max_model_len=128, block_size=32,
                          attention_backend="CPU_MLA", enable_return_routed_experts=capture).create_engine_config()

    assert config(False).cache_config.enable_prefix_caching is False  # the platform's doing, capture or not
    with pytest.raises(ValueError, match=r"vllm_cpu_capture_0_32: routing capture needs prefix caching, which is "
                                         r"off for this model with latent attention .*vLLM's CPU build turns it off "
                                         r"unless .*attention backend CPU_MLA, dtype torch.float32"):
        config(True)
    # Without the patch's check, vLLM's own names only the missing cache.
    monkeypatch.setattr(patch, "_latent_attention_refusal", lambda config: None)
    with pytest.raises(ValueError, match=r"Value error, AuxOutput Connector requires prefix caching\. ") as bare:
        config(True)
    assert "latent attention" not in str(bare.value)


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
    ids1 = torch.tensor([[4, 5], [6, 7], [1, 2], [3, 0]], dtype=torch.int32)
    cap.capture(1, ids1)  # layer 1 routes in this forward only
    cap.snapshot_routing_data(4)
    cap.capture(0, ids0)
    cap.capture(2, ids2.t().contiguous().t())  # a strided tensor reads the same
    rows = cap.snapshot_routing_data(4)  # the fifth row is padding past the step's tokens
    assert rows.shape == (4, 3, 2) and rows.dtype == torch.uint8
    assert torch.equal(rows[:, 0], ids0[:4].to(torch.uint8)) and torch.equal(rows[:, 2], ids2[:4].to(torch.uint8))
    # Layer 1 did not route in this forward (a dense layer): zero rows, not the last forward's.
    assert torch.equal(rows[:, 1], torch.zeros(4, 2, dtype=torch.uint8))
    cap.capture(0, ids2)
    cap.capture(1, ids0)
    cap.capture(2, ids2)
    again = cap.snapshot_routing_data(5)
    assert torch.equal(rows[:, 0], ids0[:4].to(torch.uint8))  # a snapshot is the step's own: the next forward leaves it
    assert torch.equal(again, torch.stack([ids2, ids0, ids2], dim=1).to(torch.uint8))
    with pytest.raises(RuntimeError, match="no MoE layer routed"):
        cap.snapshot_routing_data(4)  # each step starts empty: nothing of the last forward is reused
    cap.capture(0, ids0[:2])
    with pytest.raises(RuntimeError, match=r"layers \[0\] routed fewer than the step's 4 tokens"):
        cap.snapshot_routing_data(4)
    with pytest.raises(IndexError, match="layer 3 is outside the model's 3 layers"):
        cap.capture(3, ids0)
    wide = StepCapturer(_native_capturer(dtype="uint16"))  # above 256 experts vLLM returns uint16
    wide.capture(0, torch.tensor([[300, 2]]))
    assert wide.snapshot_routing_data(1).tolist() == [[[300, 2], [0, 0], [0, 0]]]


def test_take_output_reads_a_step_routing_as_vllms_take_output_reads_its_dict():
    """The scheduler's per-request ``take_output`` on a ``StepRouting`` returns exactly the rows vLLM's
    own returns on the same outputs, for rows within, at and before the accepted range, and refuses
    what vLLM refuses (a missing request, rows short of the accepted tokens, a finished request with
    no accepted rows) with an error naming the request."""
    from types import SimpleNamespace

    import numpy as np
    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector, AuxRequestOutput

    from verl_r3.patches import vllm_cpu_capture_0_32 as patch

    rng = np.random.default_rng(1)
    outputs = {f"req-{i}": AuxRequestOutput(start, rng.integers(0, 8, (n, 4, 2), dtype=np.uint8))
               for i, (start, n) in enumerate([(70, 1), (64, 6), (0, 37), (12, 1)])}
    packed = patch.StepRouting(tuple(outputs), [o.token_start for o in outputs.values()],
                               np.cumsum([0] + [len(o.rows) for o in outputs.values()]).tolist(),
                               np.concatenate([o.rows for o in outputs.values()]))

    def request(rid, num_tokens, finished=False):
        return SimpleNamespace(request_id=rid, num_tokens=num_tokens, is_finished=lambda: finished)

    cases = [request("req-0", 72), request("req-1", 71), request("req-1", 68), request("req-2", 38),
             request("req-2", 1), request("req-3", 12), request("req-3", 13, finished=True)]
    with reverted(patch):
        vllm_take = AuxOutputSchedulerConnector.take_output  # vLLM's own, whatever an earlier test applied
        patch.apply()
        connector = AuxOutputSchedulerConnector()
        assert AuxOutputSchedulerConnector.take_output is not vllm_take
        for req in cases:
            want, got = vllm_take(connector, req, outputs), connector.take_output(req, packed)
            assert (got is None) == (want is None), req
            if want is not None:
                assert got.dtype == want.dtype and np.array_equal(got, want), req
        assert connector.take_output(request("req-3", 13), outputs).shape == (0, 4, 2)  # a dict goes to vLLM's
        with pytest.raises(RuntimeError, match="no routing rows for request req-9"):
            connector.take_output(request("req-9", 5), packed)
        with pytest.raises(RuntimeError, match="request req-1 accepted tokens 64 to 70, but the worker sent routing "
                                               "rows for tokens 64 to 69 only"):
            connector.take_output(request("req-1", 72), packed)
        with pytest.raises(RuntimeError, match="request req-3 finished with 10 routed tokens, but its routing rows "
                                               "this step start at token 12"):
            connector.take_output(request("req-3", 11, finished=True), packed)
        for bad in (request("req-1", 72), request("req-3", 11, finished=True)):
            with pytest.raises(AssertionError):
                vllm_take(connector, bad, outputs)  # vLLM refuses the same


def _meta_items(meta) -> tuple:
    """A step's metadata with every dict as its items in order (dict equality ignores order)."""
    return (meta.generation, list(meta.requests.items()),
            [(rid, h.data, h.item_size) for rid, h in meta.block_hashes.items()], meta.finished_requests)


def test_build_connector_meta_gives_vllms_metadata_in_vllms_order():
    """The patch's scheduler-side metadata equals vLLM's, key for key and in order, at every step of a
    random schedule: requests whose routing starts before, inside, at the end of and past their prompts,
    chunked prefill, decoding, block hashes that grow for scheduled requests and for requests left out
    of a step, requests that finish (with new hashes and without) or are preempted and come back, and a
    prefix-cache reset. A shrunk hash history is refused as vLLM refuses it, a request without sampling
    parameters with an error naming it."""
    import random
    from types import SimpleNamespace

    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector

    from verl_r3.bench.vllm_commit import SimRequest
    from verl_r3.patches import vllm_cpu_capture_0_32 as patch

    with reverted(patch):
        vllm_build = AuxOutputSchedulerConnector.build_connector_meta  # vLLM's own
    rnd = random.Random(3)
    theirs, ours = AuxOutputSchedulerConnector(), AuxOutputSchedulerConnector()
    requests, live, waiting = {}, [], []
    seen = {"tail_hashes": 0, "finished_hashes": 0, "finished_bare": 0, "starts_in_prompt": 0, "resets": 0,
            "preempted": 0}
    for step in range(600):
        if len(live) < 6 and rnd.random() < 0.4:
            if waiting and rnd.random() < 0.5:
                req = waiting.pop(0)
            else:
                req = SimRequest(f"r{step}", [rnd.randrange(1, 250) for _ in range(rnd.randrange(1, 3 * BLOCK))],
                                 rnd.randrange(1, 3 * BLOCK), BLOCK)
                prompt = req.num_prompt_tokens
                req.sampling_params.routed_experts_prompt_start = rnd.choice([0, 1, prompt // 2, prompt, prompt + 5])
            req.num_computed = 0
            requests[req.request_id] = req
            live.append(req)
        if step % 150 == 75:  # a prefix-cache reset: hashes are sent again under a new generation
            for connector in (theirs, ours):
                connector.reset()
            seen["resets"] += 1
        scheduled = {}
        for req in live:
            if rnd.random() < 0.8:
                scheduled[req.request_id] = rnd.randrange(1, req.num_tokens - req.num_computed + 1)
        step_output = SimpleNamespace(num_scheduled_tokens=scheduled)
        want, got = vllm_build(theirs, step_output, requests), patch._build_connector_meta(ours, step_output, requests)
        assert _meta_items(got) == _meta_items(want), step
        assert theirs._sent_hash_counts == ours._sent_hash_counts and not ours._finished_requests, step
        seen["tail_hashes"] += any(rid not in want.requests and rid not in want.finished_requests
                                   for rid in want.block_hashes)
        seen["finished_hashes"] += any(rid in want.block_hashes for rid in want.finished_requests)
        seen["finished_bare"] += any(rid not in want.block_hashes for rid in want.finished_requests)
        seen["starts_in_prompt"] += any(0 < start < requests[rid].num_prompt_tokens and not requests[rid].num_computed
                                        for rid, start in want.requests.items())
        for req in live:
            if req.request_id in scheduled:
                req.num_computed += scheduled[req.request_id]
                if req.num_computed == req.num_tokens:  # the step sampled a token
                    req.tokens.append(rnd.randrange(1, 250))
            elif rnd.random() < 0.3 and req.num_computed == req.num_tokens - 1 and req.num_output_tokens:
                req.tokens.append(rnd.randrange(1, 250))  # a token settled after the step was scheduled
        for req in list(live):
            if req.num_output_tokens >= req.max_new or rnd.random() < 0.03:
                live.remove(req)
                for connector in (theirs, ours):
                    connector.request_finished(req)
                if req.num_output_tokens < req.max_new:
                    waiting.append(req)  # preempted: it comes back and starts over
                    seen["preempted"] += 1
    assert all(n >= 3 for n in seen.values()), sorted(seen.items())

    req = SimRequest("short", [1, 2, 3, 4, 5], 3, BLOCK)
    for connector in (theirs, ours):
        connector._sent_hash_counts["short"] = 2  # more hashes sent than the request has
    with pytest.raises(AssertionError, match="shrank"):
        vllm_build(theirs, SimpleNamespace(num_scheduled_tokens={"short": 1}), {"short": req})
    with pytest.raises(AssertionError, match="shrank"):
        patch._build_connector_meta(ours, SimpleNamespace(num_scheduled_tokens={"short": 1}), {"short": req})
    req = SimRequest("pooled", [1, 2], 1, BLOCK)
    req.sampling_params = None
    with pytest.raises(RuntimeError, match="request pooled has no sampling parameters"):
        patch._build_connector_meta(AuxOutputSchedulerConnector(), SimpleNamespace(num_scheduled_tokens={"pooled": 1}),
                                    {"pooled": req})


def test_step_routing_pickles_as_one_array_and_reads_like_vllms_dict():
    import pickle

    import numpy as np
    from vllm.distributed.aux_output_connector.connector import AuxRequestOutput

    from verl_r3.patches.vllm_cpu_capture_0_32 import StepRouting

    rng = np.random.default_rng(0)
    outputs = {f"req-{i}": AuxRequestOutput(10 * i, rng.integers(0, 8, (n, 4, 2), dtype=np.uint8))
               for i, n in enumerate([1, 1, 37, 1, 5])}
    bounds = np.cumsum([0] + [len(o.rows) for o in outputs.values()]).tolist()
    packed = StepRouting(tuple(outputs), [o.token_start for o in outputs.values()], bounds,
                         np.concatenate([o.rows for o in outputs.values()]))
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
    empty = pickle.loads(pickle.dumps(StepRouting((), [], [0], None)))
    assert len(empty) == 0 and "req-0" not in empty


CAPTURER_PROBE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, block_size=32,
          enable_prefix_caching=True, enable_return_routed_experts=True, seed=0)
runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
out = llm.generate([{"prompt_token_ids": [5, 9, 14, 3]}], SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
c = out[0].outputs[0]
print("RESULT " + json.dumps({"capturer": type(runner._verl_r3_routing_connector._capturer).__name__,
                              "tokens": list(c.token_ids), "routing": c.routed_experts.tolist(),
                              "fast_rows": runner._verl_r3_commit.fast_rows,
                              "full_requests": runner._verl_r3_commit.full_requests}))
"""


def test_the_engine_captures_through_the_per_layer_capturer_and_the_step_commit():
    """In a real engine (in one process, to reach its runner) the routers are bound to StepCapturer,
    decode rows inside an open block take StepCommit's short path and the rest vLLM's commit, and
    the rows equal transformers' routing of the same tokens (the concurrent, preempted and
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
    # Positions 0-3 are the prompt (one prefill step, vLLM's commit); 4..42 are decoded one a step.
    # Of those, 31 completes the first 32-token block (vLLM's commit); StepCommit opens the next
    # block itself, so the other 38, the one at 32 among them, are written by the short path.
    assert len(result["tokens"]) == 40
    assert (result["fast_rows"], result["full_requests"]) == (38, 2)
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


# -- StepCommit against vLLM's own commit, step by step, on a scheduled workload ------------------
BLOCK, LAYERS, TOP_K, EXPERTS = 4, 3, 2, 8


def _row(tokens: list[int], position: int):
    """A routing row that depends on the token prefix, as a model's does: prefix-cache hits must
    bring back exactly the rows of the request that computed those tokens."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(bytes(tokens[:position + 1])).digest()
    return (np.frombuffer(digest[:LAYERS * TOP_K], dtype=np.uint8) % EXPERTS).reshape(LAYERS, TOP_K)


def _request_states(connector, commit=None) -> dict:
    """What the worker connector holds of each request after a step has begun; with ``commit``, its
    cursors as they read once the short path's advances are written back (read, not written, so
    that the test leaves StepCommit to write them back itself before vLLM's code reads them)."""
    lagging = commit.unsynced() if commit is not None else {}
    return {rid: (list(s.aux_output_keys), [(start, rows.tobytes()) for start, rows in s.pending_blocks],
                  *((lagging[rid],) * 3 if rid in lagging else (s.capture_cursor, s.scheduled_cursor, s.emit_cursor)),
                  s.pending_outputs, s.finished)
            for rid, s in connector._requests.items()}


def test_step_commit_begin_refuses_a_scheduler_start_past_what_the_worker_emitted():
    """The check vLLM's begin_step makes of each settled request is made on the short path too."""
    from vllm.distributed.aux_output_connector.connector import AuxOutputConnectorMetadata

    from verl_r3.bench.vllm_commit import worker_connector
    from verl_r3.patches.vllm_cpu_capture_0_32 import StepCommit

    connector = worker_connector(block_size=BLOCK, layers=LAYERS, top_k=TOP_K, max_num_seqs=4,
                                 max_num_batched_tokens=64, store_bytes=1 << 20)
    try:
        commit = StepCommit(connector)
        commit.begin(AuxOutputConnectorMetadata(0, {"a": 0, "b": 0}, {}, ()))  # new requests: vLLM's walk
        assert (commit.begin_full, commit.begin_fast) == (1, 0) and connector._requests.keys() == {"a", "b"}
        commit.begin(AuxOutputConnectorMetadata(0, {"a": 0, "b": 0}, {}, ()))
        assert (commit.begin_full, commit.begin_fast) == (1, 1)
        with pytest.raises(RuntimeError, match="request b: the scheduler starts its routing at token 3, past the 0"):
            commit.begin(AuxOutputConnectorMetadata(0, {"a": 0, "b": 3}, {}, ()))
        commit.begin(AuxOutputConnectorMetadata(0, {"a": 0}, {}, ("b",)))  # a request finishes: vLLM's walk
        assert (commit.begin_full, commit.begin_fast) == (2, 1) and connector._requests.keys() == {"a"}
    finally:
        connector._store.close()


def test_step_commit_begin_checks_the_kept_batch_against_its_own_cursors_in_the_schedulers_order():
    """Once a step's batch is kept, the short path's advances live in StepCommit's lists (the
    connector's states lag them), a request still prefilling is off the short path (its emit cursor
    is the state's), and the batch's order is the worker's, not the scheduler's: the check must read
    each request's own cursor."""
    import numpy as np
    from vllm.distributed.aux_output_connector.connector import AuxOutputConnectorMetadata

    from verl_r3.bench.vllm_commit import worker_connector
    from verl_r3.patches.vllm_cpu_capture_0_32 import StepCommit

    connector = worker_connector(block_size=BLOCK, layers=LAYERS, top_k=TOP_K, max_num_seqs=4,
                                 max_num_batched_tokens=64, store_bytes=1 << 20)

    def rows(n):
        return np.arange(n * LAYERS * TOP_K, dtype=np.uint8).reshape(n, LAYERS, TOP_K) % EXPERTS

    def meta(**starts):
        return AuxOutputConnectorMetadata(0, starts, {}, ())

    sampled = np.array([1, 1, 0], dtype=np.int32)  # c prefills its 6-token prompt in chunks of 2
    try:
        commit = StepCommit(connector)
        commit.begin(meta(a=0, b=0, c=0))
        # Batch order b, a, c: b has two prompt tokens, a one.
        out = commit(["b", "a", "c"], np.array([0, 0, 0]), np.array([0, 2, 3, 5]), rows(5), sampled)
        assert (out["b"].token_start, len(out["b"].rows), out["a"].token_start, len(out["a"].rows)) == (0, 2, 0, 1)
        assert "c" not in out
        commit.begin(meta(a=1, b=2, c=0))
        fast = commit.fast_rows
        out = commit(["b", "a", "c"], np.array([2, 1, 2]), np.array([0, 1, 2, 4]), rows(4), sampled)
        assert commit.fast_rows == fast + 2 and (out["b"].token_start, out["a"].token_start) == (2, 1)
        assert commit.unsynced() == {"b": 3, "a": 2}  # the connector's states still read 2 and 1
        begun = commit.begin_fast
        commit.begin(meta(a=2, b=3, c=0))
        assert commit.begin_fast == begun + 1
        with pytest.raises(RuntimeError, match="request b: the scheduler starts its routing at token 4, past the 3"):
            commit.begin(meta(a=2, b=4, c=0))
        with pytest.raises(RuntimeError, match="request a: the scheduler starts its routing at token 3, past the 2"):
            commit.begin(meta(a=3, b=3, c=0))
        with pytest.raises(RuntimeError, match="request c: the scheduler starts its routing at token 1, past the 0"):
            commit.begin(meta(a=2, b=3, c=1))
        commit.sync()
        assert commit.unsynced() == {}
        assert [(connector._requests[r].capture_cursor, connector._requests[r].emit_cursor,
                 connector._buffer._requests[r].length) for r in ("a", "b")] == [(2, 2, 2), (3, 3, 3)]
        # c's first block is complete (and waits for its key); nothing of it was emitted.
        c = connector._requests["c"]
        assert (c.capture_cursor, c.emit_cursor, len(c.pending_blocks)) == (4, 0, 1)
        # A step with no requests (nothing ran) gives an empty output, as vLLM's commit does.
        empty = commit([], np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), rows(0), np.zeros(0, dtype=bool))
        assert len(empty) == 0 and empty.rows is None
    finally:
        connector._store.close()


def test_step_commit_returns_and_stores_what_vllms_commit_does_under_chunks_preemption_and_prefix_hits():
    """Two copies of vLLM's worker-side connector follow one simulated scheduler (vLLM's own
    scheduler-side connector builds every step's metadata): one commits each step through vLLM's
    prepare_output and process_output, the other through StepCommit. Every step's outputs must be
    identical, so must every request's state in the connector once a step has begun (vLLM's
    begin_step on one side, StepCommit.begin on the other), every block either side stored, and every
    request's routing, gathered as
    vLLM's scheduler takes it, must equal the rows of its tokens: chunked prefill, preemption,
    prefix-cache hits on prompts and on decoded blocks (a next turn of a finished request)."""
    import random
    from types import SimpleNamespace

    import numpy as np
    from vllm.distributed.aux_output_connector.connector import AuxOutputSchedulerConnector

    from verl_r3.bench.vllm_commit import SimRequest, vllm_commit, worker_connector
    from verl_r3.patches.vllm_cpu_capture_0_32 import StepCommit

    rnd, order = random.Random(0), random.Random(1)
    shared = [rnd.randrange(1, 250) for _ in range(2 * BLOCK + 1)]

    def request(rid, prompt, max_new):
        req = SimRequest(rid, prompt, max_new, BLOCK)
        req.hit, req.decoded_before = None, 0  # tokens from the prefix cache at admission; a parent's prompt
        return req

    waiting = []
    for i in range(40):
        own = [rnd.randrange(1, 250) for _ in range(rnd.randrange(1, 3 * BLOCK))]
        waiting.append(request(f"r{i}", (shared + own) if i % 3 == 0 else own, rnd.randrange(1, 6 * BLOCK)))
    kw = dict(block_size=BLOCK, layers=LAYERS, top_k=TOP_K, max_num_seqs=8, max_num_batched_tokens=16,
              store_bytes=1 << 20)
    scheduler, vllm_side, ours = AuxOutputSchedulerConnector(), worker_connector(**kw), worker_connector(**kw)
    commit = StepCommit(ours)
    requests, running, computed_blocks, taken, turns = {}, [], set(), {}, []
    hits = preempted = steps = fast_with_hashes = 0
    while waiting or running:
        steps += 1
        assert steps < 2000
        if running and rnd.random() < 0.15:  # preempt: vLLM tells the connector the request is done
            victim = running.pop(rnd.randrange(len(running)))
            scheduler.request_finished(victim)
            victim.num_computed = 0
            waiting.insert(0, victim)
            preempted += 1
        elif len(running) < 6 and waiting and rnd.random() < 0.7:
            req = waiting.pop(0)
            hashes = req.block_hashes
            cached = 0
            while cached < len(hashes) and hashes[cached] in computed_blocks:
                cached += 1
            req.num_computed = min(cached, (req.num_tokens - 1) // BLOCK) * BLOCK  # a hit is whole blocks
            hits += req.num_computed > 0
            req.hit = req.num_computed if req.hit is None else req.hit
            requests[req.request_id] = req
            running.append(req)
        budget, scheduled = 16, {}
        for req in running:
            n = min(budget, req.num_tokens - req.num_computed)
            if n > 0:
                scheduled[req.request_id] = n
                budget -= n
        meta = scheduler.build_connector_meta(SimpleNamespace(num_scheduled_tokens=scheduled), requests)
        vllm_side.begin_step(meta)
        fast = commit.begin_fast
        commit.begin(meta)
        fast_with_hashes += commit.begin_fast > fast and bool(meta.block_hashes)
        assert _request_states(ours, commit) == _request_states(vllm_side), steps
        if not scheduled:
            continue
        ids = list(scheduled)
        if order.random() < 0.2:  # the worker's batch order need not be the scheduler's
            order.shuffle(ids)
        starts = np.array([requests[r].num_computed for r in ids])
        bounds = np.cumsum([0] + [scheduled[r] for r in ids])
        rows = np.stack([_row(requests[r].tokens, p) for r in ids
                         for p in range(requests[r].num_computed, requests[r].num_computed + scheduled[r])])
        sampled = np.array([int(requests[r].num_computed + scheduled[r] == requests[r].num_tokens) for r in ids],
                           dtype=np.int32)
        want = vllm_commit(vllm_side, ids, starts, bounds, rows.copy(), sampled)
        got = commit(ids, starts, bounds, rows, sampled)
        assert sorted(got) == sorted(want), steps
        for rid in want:
            assert got[rid].token_start == want[rid].token_start and np.array_equal(got[rid].rows, want[rid].rows), (
                steps, rid)
        sampled_of = dict(zip(ids, sampled.tolist()))
        for rid in scheduled:  # in the scheduler's order, whatever the batch's
            s = sampled_of[rid]
            req = requests[rid]
            req.num_computed += scheduled[rid]
            computed_blocks.update(req.block_hashes[:req.num_computed // BLOCK])
            if not s:
                continue
            req.tokens.append(rnd.randrange(1, 250))
            req.finished = req.num_output_tokens >= req.max_new
            part = scheduler.take_output(req, got)
            if part is not None:
                taken.setdefault(rid, []).append(part)
            if req.finished:
                running.remove(req)
                scheduler.request_finished(req)
                if len(turns) < 20 and rnd.random() < 0.5:
                    # A next turn: its prompt is this conversation so far, so it hits the blocks decoded here.
                    turns.append(request(f"t{len(turns)}", req.tokens + [rnd.randrange(1, 250)], rnd.randrange(1, 9)))
                    turns[-1].decoded_before = req.num_prompt_tokens
                    waiting.append(turns[-1])
    assert hits >= 3 and preempted >= 3 and len(turns) >= 10
    assert sum(t.hit > t.decoded_before + BLOCK for t in turns) >= 5  # decoded blocks came back from the store
    assert commit.fast_rows > 100 and commit.full_requests > 50
    # Steps that only continue requests begin without vLLM's request walk, with and without block hashes.
    assert commit.begin_fast >= 30 and fast_with_hashes >= 10 and commit.begin_full >= 100
    for rid, req in requests.items():
        expected = np.stack([_row(req.tokens, p) for p in range(req.num_tokens - 1)])
        assert np.array_equal(np.concatenate(taken[rid]), expected), rid
    for side in (vllm_side, ours):  # vLLM's store writes on a background thread: let each side's queue drain
        side._store._queue.join()
    keys = list(vllm_side._store._store._lru)  # every block either side published, byte for byte
    assert len(keys) > 100 and sorted(keys) == sorted(ours._store._store._lru)
    assert ours._store.get_concatenated(keys) == vllm_side._store.get_concatenated(keys)
    vllm_side._store.close()
    ours._store.close()
