"""SGLang's native routing capture on CPU, checked against a transformers fp32 recomputation.

The test runs in the project's environment; SGLang runs in its own (scripts/sglang_env.sh,
built by ``make test`` before the tests) through sglang_capture_driver.py in a subprocess
under a wall-clock limit. One engine serves every case: two requests that share a long prefix
(the second is served from SGLang's radix cache), then 18 concurrent prompts of different
lengths and output budgets, each sampled twice (n=2), in a KV pool small enough that SGLang
retracts running requests and recomputes them later. Every (token, layer) router of every output must equal
the top-k of a transformers forward over prompt + output in fp32.

DeepSeek-V3 (multi-head latent attention, grouped biased sigmoid routing, a dense first layer),
Mixtral and OLMoE get an engine each, with a radix-cache hit and n=2: their routers must equal
transformers' too, and DeepSeek-V3's dense layer must read as missing.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from verl_r3 import RouterReplay
from verl_r3.engines import sglang_engine
from verl_r3.patches import verl_sglang_server_0_9
from verl_r3.quickstart.model import build_config, build_tokenizer
from family_models import save_family_model

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("sglang_capture_driver.py")
ENV_BUILD_TIMEOUT_S = 1200  # only when the environment is missing (make test builds it first)
DRIVER_TIMEOUT_S = 300
LAYERS, EXPERTS, TOP_K = 4, 8, 2


def sglang_python() -> str:
    """The SGLang environment's python, built by scripts/sglang_env.sh if missing."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "sglang_env.sh")], capture_output=True, text=True,
                          timeout=ENV_BUILD_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/sglang_env.sh failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return str(Path(done.stdout.strip().splitlines()[-1]) / "bin" / "python")


def run_driver(spec: dict, tmp: Path) -> dict:
    """Run the driver in the SGLang environment; its process group is killed on timeout."""
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sglang_python(), str(DRIVER), str(spec_file)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        raise AssertionError(f"SGLang driver exceeded {DRIVER_TIMEOUT_S} s; stderr tail:\n{err[-4000:]}")
    if proc.returncode != 0 or not out.strip():
        raise AssertionError(f"SGLang driver failed ({proc.returncode}); stderr tail:\n{err[-6000:]}")
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sglang_model")
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, hidden_size=128, layers=LAYERS, experts=EXPERTS, top_k=TOP_K)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spec(model_dir) -> dict:
    rng = random.Random(0)
    vocab = 256  # byte tokens only: no special tokens inside prompts
    prefix = [rng.randrange(vocab) for _ in range(96)]
    prompts = [[rng.randrange(vocab) for _ in range(4 + 5 * i)] for i in range(18)]
    return {
        "model": str(model_dir),
        "checks": ["patch", "compact", "weight_sync", "verl_server", "capture"],
        # 18 prompts x 2 samples need about 2,900 tokens of KV at their longest. SGLang admits a
        # request on an estimate of the tokens it will still generate: all of max_new_tokens
        # with ignore_eos, else a fraction that schedule_conservativeness scales (0.05 makes it
        # optimistic). The batch therefore goes without ignore_eos (the random model rarely
        # samples its end-of-sequence token, so most outputs still run to max_new_tokens): the
        # pool is overcommitted, and SGLang retracts running requests when it runs out and
        # recomputes them later.
        "engine_args": {"max_total_tokens": 640, "schedule_conservativeness": 0.05},
        "prefix": prefix,
        "tails": [[rng.randrange(vocab) for _ in range(6)] for _ in range(2)],
        "prefix_new_tokens": 8,
        "prompts": prompts,
        "max_new_tokens": [24 + 4 * (i % 7) for i in range(len(prompts))],
        "ignore_eos": [False] * len(prompts),
        "n": 2,
    }


@pytest.fixture(scope="module")
def result(spec, tmp_path_factory) -> dict:
    return run_driver(spec, tmp_path_factory.mktemp("sglang_run"))


def transformers_routing(model_dir):
    """Routing of a transformers fp32 forward: ids -> [len(ids), L, K] (native top-k; -1 in a dense layer)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 experts_implementation="eager").eval()
    rr = RouterReplay(model)

    def routing(ids: list[int]) -> torch.Tensor:
        with torch.no_grad(), rr.record() as rec:
            model(input_ids=torch.tensor([ids]))
        return rec.routed_experts[0]

    return routing


@pytest.fixture(scope="module")
def reference(model_dir):
    return transformers_routing(model_dir)


def assert_routing_matches(sample: dict, reference, who: str, dims=(LAYERS, TOP_K, EXPERTS), dense=(),
                           id_bytes=1) -> None:
    """``sample``'s SGLang routing equals ``reference`` at every (token, layer); layers ``dense``
    (without a router) read as missing, and verl's SGLang server hands on zeros there. SGLang sent
    ``id_bytes`` per id: 1 with compact routing (up to 255 experts), 4 without."""
    layers, top_k, experts = dims
    seq = sample["prompt"] + sample["output_ids"]
    meta = {key: sample[key] for key in ("routed_experts", "prompt_tokens", "completion_tokens")}
    assert len(base64.b64decode(sample["routed_experts"])) == (len(seq) - 1) * layers * top_k * id_bytes, who
    record = sglang_engine.routing_record(meta, num_layers=layers, top_k=top_k, num_experts=experts)
    # SGLang's rows cover positions [0, N - 1): the last sampled token is never fed back.
    assert (record.start, record.rows) == (0, len(seq) - 1), who
    moe = [layer for layer in range(layers) if layer not in dense]
    missing = record.missing_mask()
    assert missing[:, list(dense)].all() and not missing[:, moe].any(), who
    got = record.to_dense().sort(dim=-1).values
    want = reference(seq)[: len(seq) - 1].to(got.dtype).sort(dim=-1).values
    differ = (got != want).any(dim=-1)  # [N - 1, L]
    assert not differ.any(), (
        f"{who}: {int(differ.sum())} of {differ.numel()} (token, layer) routers differ from the transformers "
        f"reference, first at (row, layer) {differ.nonzero()[0].tolist()}"
    )
    # verl's SGLang server (with verl_sglang_server_0_9) hands the same ids on at one byte each.
    meta = {"id": who, **meta}
    verl_sglang_server_0_9.decode_routed_experts(meta, layers, top_k, experts)
    decoded = meta["routed_experts"]
    assert decoded.dtype == torch.uint8, who
    assert (decoded[:, list(dense)] == 0).all(), who
    assert torch.equal(decoded[:, moe].to(got.dtype).sort(dim=-1).values, got[:, moe]), who


@pytest.mark.slow
def test_patch_applies_reverts_and_never_leaves_a_vllm_module_behind(result):
    p = result["patch"]
    assert p["vllm_installed"] is False
    # Unpatched, SGLang cannot build its rotary embedding on this device, and has no "cpu" allocator.
    assert p["before_rotary_error"] and "vllm" in p["before_rotary_error"]
    assert p["before_cpu_entry"] is False
    assert p["apply"] == [True, False]  # idempotent
    assert p["applied_cpu_entry_is_patch"] and p["applied_rotary_ok"]
    assert p["vllm_left_in_sys_modules"] is False
    assert p["alloc_shape"] == [3, 4, 2] and p["alloc_pinned"] is False
    assert p["revert"] == [True, False]
    assert p["after_cpu_entry"] is False
    assert p["after_rotary_error"] and "vllm" in p["after_rotary_error"]
    # A latent attention layer on the torch-native backend: SGLang's Triton handler (plain multi-head
    # attention for a fresh prefill, which misreads the latent KV cache) unpatched, the absorbed form patched.
    assert p["before_mla_handler"] == ["sglang", "handle_attention_triton"]
    assert p["applied_mla_handler"] == ["patch", "MLA"]
    assert p["after_mla_handler"] == ["sglang", "handle_attention_triton"]


@pytest.mark.slow
def test_compact_routing_patch_applies_and_reverts(result):
    c = result["compact"]
    sglang, patch = "sglang.srt.state_capturer.routed_experts", "verl_r3.patches.sglang_compact_routing_0_5"
    assert c["before"] == [sglang, sglang] and c["after"] == [sglang, sglang]
    assert c["applied"] == [patch, patch]
    assert c["apply"] == [True, False] and c["revert"] == [True, False]


@pytest.mark.slow
def test_weight_sync_patch_lets_cpu_tensors_through_sglangs_reducer(result):
    w = result["weight_sync"]
    assert w["before"].startswith("IndexError")  # SGLang's CUDA-only reducer patch, unpatched
    assert w["apply"] == [True, False] and w["strategy"] == "file_system"
    assert w["applied"] is True  # pickled and unpickled to an equal tensor
    assert w["revert"] == [True, False]
    assert w["after"].startswith("IndexError") and w["strategy_after"] == "file_descriptor"


@pytest.mark.slow
def test_verl_server_patch_against_sglang_0_5_23(result):
    v = result["verl_server"]
    assert "abstract" in v["adapter_before"] and "begin_weight_update" in v["adapter_before"]
    assert v["apply"] == [True, False]
    assert v["adapter_applied"] is None and v["server_args_fields"] is True
    rows = [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]
    # A model type without a verl_r3 family: SGLang's int32, as it arrived.
    assert v["decoded"] == ["torch.int32", rows, "torch.int32"]
    # vLLM's dtypes: one byte per id up to 256 experts, two above.
    assert v["decoded_narrow"] == {"12": ["torch.uint8", rows, "torch.int32"],
                                   "256": ["torch.uint8", rows, "torch.int32"],
                                   "300": ["torch.uint16", rows, "torch.int32"]}
    assert v["decoded_wide_id"] == ["torch.uint16", rows[:1] + [[[6, 7], [8, 9], [10, 299]]], "torch.int32"]
    # Payloads of sglang_compact_routing_0_5, their width told by the token counts (and the request's start).
    assert v["decoded_compact"] == [["torch.uint8", rows, "torch.uint8"], ["torch.uint8", rows, "torch.uint8"],
                                    ["torch.uint16", rows, "torch.int16"]]
    assert v["decoded_bad"] == [
        "request req-7: SGLang routed expert id 12 is outside [0, 12) for a model with 12 experts",
        "request req-7: SGLang routed expert id -1 is outside [0, 12) for a model with 12 experts",
        "request req-7: SGLang routed expert id 255 is outside [0, 12) for a model with 12 experts (as sent compact: "
        "SGLang's ids are clamped to [-1, 12], -1 being 255 in uint8)",
        "request req-7: SGLang routed expert id -1 is outside [0, 300) for a model with 300 experts (as sent compact: "
        "SGLang's ids are clamped to [-1, 300], -1 being 255 in uint8)",
        "request req-8: SGLang routed_experts is not valid base64: Only base64 data is allowed",
        "request req-8: SGLang routed_experts has 44 bytes for 2 rows x num_layers=3 x top_k=2 ids: not 1, 2 or 4 "
        "bytes per id (the output's token counts and its routing disagree)",
        "request req-9: SGLang meta_info has no usable prompt_tokens and completion_tokens (KeyError('prompt_tokens'))"
        "; they give the number of routing rows: pass the output's meta_info whole"]
    assert v["num_experts"] == [12, None]
    refused, plain = v["launch"]
    assert refused.startswith("ValueError: verl_sglang_server_0_9: actor_rollout_ref.rollout.skip_tokenizer_init=False"
                              " with routing replay"), refused
    assert not plain.startswith("ValueError: verl_sglang_server_0_9"), plain  # without replay it goes on to verl's
    assert v["revert"] == [True, False]
    assert "abstract" in v["adapter_after"]


@pytest.mark.slow
def test_concurrent_sampled_requests_return_the_reference_routing(result, spec, reference):
    batch = result["capture"]["batch"]
    n = spec["n"]
    assert len(batch) == n * len(spec["prompts"])
    for j, sample in enumerate(batch):
        i = j // n
        assert sample["prompt_tokens"] == len(spec["prompts"][i])
        # Each output runs to its own max_new_tokens unless it samples the end-of-sequence token.
        stopped = sample["finish_reason"]["type"] == "stop"
        assert stopped or len(sample["output_ids"]) == spec["max_new_tokens"][i], f"sample {j}"
        assert not (stopped and spec["ignore_eos"][i]), f"sample {j}"
        assert_routing_matches(sample, reference, f"prompt {i}, sample {j % n}")
    assert len({len(s["output_ids"]) for s in batch}) >= 7  # outputs of many lengths
    # The n samples of a prompt are sampled independently.
    assert any(batch[n * i]["output_ids"] != batch[n * i + 1]["output_ids"] for i in range(len(spec["prompts"])))


@pytest.mark.slow
def test_a_prefix_served_from_the_radix_cache_keeps_its_routing(result, spec, reference):
    first, second = result["capture"]["prefix"]
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] >= len(spec["prefix"]), second["cached_tokens"]
    for k, sample in enumerate((first, second)):
        assert_routing_matches(sample, reference, f"prefix request {k}")


@pytest.mark.slow
def test_retracted_requests_keep_their_routing(result, spec, reference):
    batch = result["capture"]["batch"]
    retracted = [j for j, s in enumerate(batch) if s["num_retractions"] > 0]
    assert retracted, "no request was retracted: shrink max_total_tokens or lengthen the outputs"
    for j in retracted:  # already compared above; named here so a failure says which case broke
        assert_routing_matches(batch[j], reference, f"retracted sample {j}")


# -- the other families SGLang's CPU paths serve -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral", "olmoe"])
def test_other_families_return_transformers_routing(family, tmp_path):
    """More families, each on its own engine in fp32: a request whose prefix comes from the radix
    cache, then 6 prompts with n=2. DeepSeek-V3 (latent attention, a dense first layer, sigmoid scores
    with a selection bias, 2 expert groups of which 1 is chosen) is verl_r3's tiny one, whose config
    carries the fields of the published one that SGLang reads. OLMoE has as many KV heads as query
    heads, as OLMoE ships: SGLang sizes its key norm by the hidden size."""
    model = save_family_model(family, tmp_path / "model", hidden_size=128, num_attention_heads=4,
                              num_key_value_heads=2 if family == "mixtral" else 4)
    cfg = model.config
    if family == "deepseek_v3":
        assert (cfg.first_k_dense_replace, cfg.n_group, cfg.topk_group) == (1, 2, 1)
    rng = random.Random(2)
    prompts = [[rng.randrange(256) for _ in range(3 + 7 * i)] for i in range(6)]
    # Mixtral's engine runs without compact routing: SGLang's own int32 reaches the same readers.
    compact = family != "mixtral"
    spec = {"model": str(tmp_path / "model"), "checks": ["capture"], "engine_args": {"max_total_tokens": 2048},
            "compact_routing": compact,
            "prefix": [rng.randrange(256) for _ in range(40)],
            "tails": [[rng.randrange(256) for _ in range(5)] for _ in range(2)],
            "prefix_new_tokens": 4, "prompts": prompts, "max_new_tokens": [6 + 3 * i for i in range(len(prompts))],
            "ignore_eos": [True] * len(prompts), "n": 2}
    result = run_driver(spec, tmp_path)["capture"]
    first, second = result["prefix"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] >= len(spec["prefix"]), second["cached_tokens"]
    batch = result["batch"]
    assert [len(s["output_ids"]) for s in batch] == [m for m in spec["max_new_tokens"] for _ in range(2)]
    dims = (cfg.num_hidden_layers, cfg.num_experts_per_tok, 8)
    reference = transformers_routing(tmp_path / "model")
    dense = tuple(layer for layer in range(cfg.num_hidden_layers) if reference(first["prompt"])[0, layer, 0] == -1)
    assert dense == ((0,) if family == "deepseek_v3" else ())
    samples = [("prefix request 0", first), ("prefix request 1", second)]
    samples += [(f"prompt {j // 2}, sample {j % 2}", s) for j, s in enumerate(batch)]
    for who, sample in samples:
        assert_routing_matches(sample, reference, f"{family} {who}", dims=dims, dense=dense,
                               id_bytes=1 if compact else 4)


# -- in the project's environment, without SGLang ----------------------------------------------


def test_patch_refuses_sglang_outside_its_window(monkeypatch):
    patch = sglang_engine.cpu_patch()
    for version in ("0.5.22", "0.6.0", "1.0.0"):
        monkeypatch.setattr(patch, "installed_version", lambda name, v=version: v)
        with pytest.raises(RuntimeError, match=r"sglang_cpu_0_5 supports sglang >=0\.5\.23,<0\.6\.0, found sglang "
                                               + version.replace(".", r"\.")):
            patch.apply()
        assert not patch.is_applied()
    for version in ("0.5.23", "0.5.30.dev0", "0.5.23+cpu"):
        monkeypatch.setattr(patch, "installed_version", lambda name, v=version: v)
        assert patch.check_version() == version
    monkeypatch.setattr(patch, "installed_version", lambda name: None)
    with pytest.raises(RuntimeError, match="sglang is not installed"):
        patch.apply()


def test_stand_in_never_shadows_an_installed_vllm(monkeypatch):
    patch = sglang_engine.cpu_patch()
    real = type(sys)("vllm")  # what an installed vLLM looks like once imported
    monkeypatch.setitem(sys.modules, "vllm", real)
    assert patch.vllm_installed()
    with patch.vllm_custom_ops_stand_in():
        assert sys.modules["vllm"] is real
    assert sys.modules["vllm"] is real


def test_stand_in_exists_only_inside_its_block(monkeypatch):
    patch = sglang_engine.cpu_patch()
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.delitem(sys.modules, "vllm._custom_ops", raising=False)
    monkeypatch.setattr(patch.importlib.util, "find_spec", lambda name, *a: None)  # as if vLLM were absent
    with patch.vllm_custom_ops_stand_in():
        from vllm._custom_ops import rotary_embedding

        with pytest.raises(RuntimeError, match="stand-in"):
            rotary_embedding()
    assert "vllm" not in sys.modules and "vllm._custom_ops" not in sys.modules


def test_start_refuses_without_the_plugin_or_with_sglangs_cpu_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    with pytest.raises(RuntimeError, match="SGLANG_USE_CPU_ENGINE=1"):
        sglang_engine.start_cpu_engine(str(tmp_path))
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    if not sglang_engine.plugin_registered():  # the project's environment registers no SGLang plugin
        with pytest.raises(RuntimeError, match="scripts/sglang_env.sh"):
            sglang_engine.start_cpu_engine(str(tmp_path))


@pytest.mark.parametrize("module", ["sglang_cpu_weight_sync_0_5", "verl_sglang_server_0_9", "sglang_compact_routing_0_5"])
def test_sglang_patches_refuse_when_sglang_is_missing_or_outside_their_window(module, monkeypatch):
    import importlib

    patch = importlib.import_module(f"verl_r3.patches.{module}")
    versions = {"verl": "0.9.1", "sglang": None}
    monkeypatch.setattr(patch, "installed_version", lambda name: versions[name])
    with pytest.raises(RuntimeError, match="sglang is not installed"):
        patch.apply()
    versions["sglang"] = "0.6.0"
    with pytest.raises(RuntimeError, match=r"supports sglang >=0\.5\.23,<0\.6\.0, found sglang 0\.6\.0"):
        patch.apply()
    assert not patch.is_applied()


def test_compact_routing_keeps_ids_outside_the_experts_outside():
    """What sglang_compact_routing_0_5 does to each step's ids before they reach the host buffer."""
    from transformers import AutoConfig
    from types import SimpleNamespace

    patch = sglang_engine.compact_routing_patch()
    ids = torch.tensor([[-7, -1, 0, 5], [7, 8, 300, 70000]], dtype=torch.int32)
    narrowed = patch.compact_ids(ids, 8, torch.uint8)
    assert narrowed.dtype == torch.uint8
    assert narrowed.tolist() == [[255, 255, 0, 5], [7, 8, 8, 8]]  # in range unchanged; outside still >= 8
    wide = patch.compact_ids(ids, 300, torch.int16)
    assert wide.tolist() == [[-1, -1, 0, 5], [7, 8, 300, 300]]
    # The dtype and expert count come from verl_r3's family of SGLang's model config.
    qwen = AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, num_experts=128, num_experts_per_tok=8)
    assert patch.model_dtype(SimpleNamespace(hf_text_config=qwen)) == (torch.uint8, 128)
    deepseek = AutoConfig.for_model("deepseek_v3", num_hidden_layers=2, n_routed_experts=256)
    assert patch.model_dtype(SimpleNamespace(hf_text_config=None, hf_config=deepseek)) == (torch.int16, 256)
    dtype, why = patch.model_dtype(SimpleNamespace(hf_text_config=AutoConfig.for_model("llama")))
    assert dtype is None and "'llama' is not a supported MoE family" in why


def test_routing_record_needs_the_outputs_token_counts():
    meta = {"routed_experts": base64.b64encode(bytes(3 * LAYERS * TOP_K)).decode()}
    with pytest.raises(ValueError, match="sample 2: SGLang meta_info has no usable prompt_tokens and completion_tokens"):
        sglang_engine.routing_record(meta, num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS, sample=2)
    # 3 rows of one byte per id, or 4 bytes per id with fewer tokens: each read by its own counts.
    ids = torch.arange(3 * LAYERS * TOP_K, dtype=torch.int32).remainder(EXPERTS).reshape(3, LAYERS, TOP_K)
    for dtype, counts in ((torch.uint8, (3, 1)), (torch.int32, (2, 2))):
        meta = {"routed_experts": base64.b64encode(ids.to(dtype).numpy().tobytes()).decode(),
                "prompt_tokens": counts[0], "completion_tokens": counts[1]}
        record = sglang_engine.routing_record(meta, num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)
        assert torch.equal(record.to_dense().to(torch.int32), ids)
    meta["completion_tokens"] = 3  # one row more than the routing holds
    with pytest.raises(ValueError, match=r"has 96 bytes for 4 rows .* not 1, 2 or 4 bytes per id"):
        sglang_engine.routing_record(meta, num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS)


def test_routing_record_names_a_missing_capture():
    with pytest.raises(ValueError, match="sample 3: .*enable_return_routed_experts=True"):
        sglang_engine.routing_record({"id": "x"}, num_layers=LAYERS, top_k=TOP_K, num_experts=EXPERTS, sample=3)
