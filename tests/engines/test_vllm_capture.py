"""Routing capture in vLLM's CPU build (verl_r3.patches.vllm_cpu_capture_0_32), end to end.

A real vLLM engine (separate processes, started through the ``vllm.general_plugins`` entry
point that applies the patch) serves concurrent requests of different prompt and output
lengths with n=2, chunked prefill, a KV cache small enough to force preemption, a shared
prefix and a second wave that hits the prefix cache, and two requests aborted mid-way. Every
returned routing row must equal a transformers recomputation of the same tokens in fp32, for
every (token, MoE layer) router. A second engine serves a model with 300 experts, whose routing
vLLM returns as uint16, through verl_r3's reader and the agent-loop compaction. A third serves a
DeepSeek-V3 (latent attention, grouped biased sigmoid routing, a dense first layer) in bfloat16,
the only dtype vLLM's CPU build runs latent attention in with prefix caching on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
import engine_harness as H  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from verl_r3 import RouterReplay  # noqa: E402
from verl_r3.core.formats import from_vllm  # noqa: E402
from verl_r3.core.record import MISSING  # noqa: E402
from verl_r3.patches.vllm_cpu_capture_0_32 import cpu_has_amx  # noqa: E402
from family_models import family_model, save_family_model, save_model_dir  # noqa: E402

DRIVER = os.path.join(os.path.dirname(__file__), "vllm_capture_driver.py")
TIMEOUT_S = 300


def run_driver(model_dir: str, spec: dict) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, DRIVER, model_dir, json.dumps(spec)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env, start_new_session=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def reference_routing(model, rr: RouterReplay, ids: list[int]) -> torch.Tensor:
    """Top-k experts of every router for tokens ``ids[:-1]`` (the rows vLLM returns), sorted."""
    with torch.no_grad(), rr.record() as handle:
        model(torch.tensor([ids[:-1]]))
    return handle.routed_experts[0].sort(-1).values


@pytest.fixture(scope="module")
def capture_run():
    path, cfg, _ = H.model_dir()  # fp32; layer 1 is dense
    prefix = [(7 * i) % 250 + 3 for i in range(40)]  # shared by half of the requests
    wave1 = []
    for i in range(16):
        own = [(11 * i + 5 * j) % 250 + 3 for j in range(3 + 5 * (i % 7))]
        prompt = (prefix + own) if i % 2 else own
        wave1.append({"prompt_ids": prompt, "max_tokens": 6 + 4 * (i % 5), "n": 2,
                      "abort_after": 3 if i in (3, 10) else 0})
    wave2 = [dict(wave1[1], abort_after=0), dict(wave1[5], abort_after=0)]  # prompts computed in wave 1
    spec = {"engine": {"max_model_len": 192, "max_num_batched_tokens": 48, "max_num_seqs": 16, "num_blocks": 8},
            "waves": [wave1, wave2]}
    result = run_driver(path, spec)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return result, cfg, model, RouterReplay(model)


@pytest.mark.slow
def test_routing_equals_a_transformers_recomputation_for_every_router(capture_run):
    result, cfg, model, rr = capture_run
    moe = sorted(rr.moe_layers)
    dense = [layer for layer in range(cfg.num_hidden_layers) if layer not in rr.moe_layers]
    compared = matched = expected = 0
    for wave in result["waves"]:
        for c in wave:  # aborted requests too: vLLM returns the routing of the tokens they got
            if not c["token_ids"]:
                continue
            ids = c["prompt_ids"] + c["token_ids"]
            expected += (len(ids) - 1) * len(moe)
            got = torch.tensor(c["routed_experts"])
            # vLLM's layout: one row per token but the last, every decoder layer, uint8 ids.
            assert c["dtype"] == "uint8"
            assert got.shape == (len(ids) - 1, cfg.num_hidden_layers, cfg.num_experts_per_tok), (c["request"], got.shape)
            assert (got[:, dense] == 0).all()  # layers without a router are left at zero
            # verl_r3's reader takes vLLM's own output as it comes: the dense layer's zeros are missing rows.
            record = from_vllm(np.asarray(c["routed_experts"], dtype=np.uint8), cfg.num_experts,
                               num_layers=cfg.num_hidden_layers, sample=c["request"])
            read = record.to_dense()
            assert (read[:, dense] == MISSING).all() and torch.equal(read[:, moe], got[:, moe].to(read.dtype))
            ref = reference_routing(model, rr, ids)[:, moe]
            equal = (got[:, moe].sort(-1).values == ref).all(-1)
            compared += equal.numel()
            matched += int(equal.sum())
            assert bool(equal.all()), (c["request"], c["index"], (~equal).nonzero()[:5].tolist())
    assert expected > 2000 and compared == expected and matched == compared


@pytest.mark.slow
def test_the_run_covered_preemption_prefix_hits_chunked_prefill_n2_and_aborts(capture_run):
    result, _, _, _ = capture_run
    wave1, wave2 = result["waves"]
    assert result["preemptions"] > 0, "the small KV cache should force vLLM to preempt and recompute"
    # The front end kept each request's rows in a RoutingRows (vllm_front_end_routing_0_32), so the
    # routing checked against transformers went through it, aborts and n=2 included.
    assert result["front_end_routing_rows"] is True
    assert result["prefix_cache_hits"] > 0 and all(c["num_cached_tokens"] > 0 for c in wave2)
    assert max(len(c["prompt_ids"]) for c in wave1) > 48  # longer than one step's token budget: chunked
    finished = [c for c in wave1 if not c["aborted"]]
    assert len(finished) == 2 * 14  # n=2: two samples per request that ran to the end
    samples = {}
    for c in finished:
        samples.setdefault(c["request"], []).append(c["token_ids"])
    assert any(a != b for a, b in samples.values())  # the two samples are sampled independently
    aborted = [c for c in wave1 if c["aborted"]]
    assert {c["request"] for c in aborted} == {3, 10}
    # Aborted after 3 tokens: they end with vLLM's abort status and the routing of what they generated.
    assert all(c["finish_reason"] == "abort" and len(c["token_ids"]) < 6 + 4 * (c["request"] % 5) for c in aborted)
    for request in (3, 10):
        assert max(len(c["token_ids"]) for c in aborted if c["request"] == request) >= 3


@pytest.mark.slow
def test_above_256_experts_vllm_returns_uint16_that_verl_r3_reads_and_compacts():
    """vLLM's routing dtype changes above 256 experts; its rows must still match transformers and
    pass through verl_r3's reader and the agent-loop compaction unchanged."""
    from verl_r3.core.record import compact_rows

    path, cfg, _ = H.model_dir(num_experts=300)  # layer 1 dense, as in the module's model
    requests = [{"prompt_ids": [(13 * i + 7 * j) % 250 + 3 for j in range(5 + 3 * i)], "max_tokens": 8}
                for i in range(4)]
    result = run_driver(path, {"engine": {"max_model_len": 64}, "waves": [requests]})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rr = RouterReplay(model)
    moe = sorted(rr.moe_layers)
    top = 0
    for c in result["waves"][0]:
        assert c["dtype"] == "uint16", c["dtype"]
        got = np.asarray(c["routed_experts"], dtype=np.uint16)
        ids = c["prompt_ids"] + c["token_ids"]
        ref = reference_routing(model, rr, ids)[:, moe]
        assert torch.equal(torch.from_numpy(got.astype(np.int64))[:, moe].sort(-1).values, ref.long())
        compact = compact_rows(torch.from_numpy(got))  # what the agent-loop worker carries to the trainer
        assert compact.dtype == (torch.int16 if got.max() > 255 else torch.uint8)  # per sample, the narrowest
        assert compact.tolist() == got.tolist()
        read = from_vllm(got, cfg.num_experts, sample=c["request"]).to_dense()
        assert (read[:, 1] == MISSING).all() and read[:, moe].tolist() == got[:, moe].tolist()
        top = max(top, int(got.max()))
    assert top > 255  # ids past one byte did come back


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "gpt_oss"])
def test_every_other_family_returns_transformers_routing_for_every_router(family):
    """The other families verl_r3 replays, each on its own engine in fp32 with n=2 and chunked prefill:
    Qwen2-MoE (shared expert, a dense first layer), Mixtral, OLMoE and GPT-OSS (router bias,
    sliding-window layers, YaRN), every (token, MoE layer) router equal to transformers'."""
    path = tempfile.mkdtemp()
    # vLLM's CPU attention takes head sizes in multiples of 32: 128 / 4 heads, and GPT-OSS's explicit one.
    model = save_family_model(family, path, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                              **({"head_dim": 32} if family == "gpt_oss" else {}))
    requests = [{"prompt_ids": [(11 * i + 5 * j) % 250 + 3 for j in range(3 + 7 * i)], "max_tokens": 6 + 3 * i,
                 "n": 2} for i in range(8)]
    result = run_driver(path, {"engine": {"max_model_len": 192, "max_num_batched_tokens": 48, "max_num_seqs": 16},
                               "waves": [requests]})
    rr = RouterReplay(model)
    moe = sorted(rr.moe_layers)
    dense = [layer for layer in range(model.config.num_hidden_layers) if layer not in rr.moe_layers]
    assert dense == ([0] if family == "qwen2_moe" else [])
    compared = 0
    for c in result["waves"][0]:
        ids = c["prompt_ids"] + c["token_ids"]
        got = torch.tensor(c["routed_experts"], dtype=torch.int64)
        assert c["dtype"] == "uint8" and got.shape == (len(ids) - 1, 3, model.config.num_experts_per_tok)
        assert (got[:, dense] == 0).all()
        equal = (got[:, moe].sort(-1).values == reference_routing(model, rr, ids)[:, moe]).all(-1)
        assert bool(equal.all()), (family, c["request"], c["index"], (~equal).nonzero()[:5].tolist())
        compared += equal.numel()
    assert compared > 1000 and len({len(c["token_ids"]) for c in result["waves"][0]}) == 8


# A router whose k-th and (k+1)-th choice (or whose last chosen and first passed-over expert group)
# lie closer than this in transformers' fp32 scores can go either way in a bfloat16 engine. On this
# test's model such flips happened below 0.002 only.
NEAR_TIE = 0.01


def deepseek_selection(router_logits: torch.Tensor, gate, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's selection from transformers' fp32 router logits: the sorted top-k ids per token
    and the margin by which the choice was made (the smaller of the group cut and the expert cut)."""
    choice = router_logits.float().sigmoid() + gate.e_score_correction_bias.float()
    per_group = cfg.n_routed_experts // cfg.n_group
    group_scores = choice.view(-1, cfg.n_group, per_group).topk(2, dim=-1).values.sum(-1)
    ranked = group_scores.sort(-1, descending=True).values
    group_cut = ranked[:, cfg.topk_group - 1] - ranked[:, cfg.topk_group]
    chosen = torch.zeros_like(group_scores, dtype=torch.bool)
    chosen.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
    allowed = choice.masked_fill(~chosen.repeat_interleave(per_group, dim=1), float("-inf"))
    ranked = allowed.sort(-1, descending=True).values
    expert_cut = ranked[:, cfg.num_experts_per_tok - 1] - ranked[:, cfg.num_experts_per_tok]
    top = allowed.topk(cfg.num_experts_per_tok, dim=-1).indices.sort(-1).values
    return top, torch.minimum(group_cut, expert_cut)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_amx(), reason="vLLM's CPU build keeps prefix caching (which capture needs) for "
                                              "latent attention only on its AMX backend: an x86 CPU with AMX")
def test_deepseek_v3_in_bfloat16_returns_transformers_routing_wherever_it_is_not_a_near_tie():
    # vLLM's CPU latent attention supports kv_lora_rank + qk_rope_head_dim = 576, DeepSeek-V3's own.
    model, tokenizer = family_model("deepseek_v3", hidden_size=128, num_hidden_layers=3, q_lora_rank=64,
                                    kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                                    num_attention_heads=2, num_key_value_heads=2)
    cfg = model.config
    dense, moe = list(range(cfg.first_k_dense_replace)), list(range(cfg.first_k_dense_replace, 3))
    assert dense == [0] and (cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok) == (2, 1, 3)
    with torch.no_grad():  # spread the sigmoid scores, so that most routers are not near-ties in bfloat16
        for layer in moe:
            model.model.layers[layer].mlp.gate.weight.normal_(0.0, 0.2)
    path = tempfile.mkdtemp()
    save_model_dir(path, model, tokenizer, torch.bfloat16)
    requests = [{"prompt_ids": [(11 * i + 5 * j) % 250 + 3 for j in range(3 + 5 * i)], "max_tokens": 6 + 2 * i,
                 "n": 2} for i in range(12)]
    spec = {"engine": {"dtype": "bfloat16", "max_model_len": 192, "max_num_batched_tokens": 48, "max_num_seqs": 16},
            "waves": [requests]}
    result = run_driver(path, spec)

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # the bf16 weights, in fp32
    rr = RouterReplay(reference)
    assert sorted(rr.moe_layers) == moe
    logits = {}
    for layer in moe:
        reference.model.layers[layer].mlp.gate.register_forward_hook(
            lambda module, args, out, layer=layer: logits.__setitem__(layer, out[0]))
    checked = near = 0
    for c in result["waves"][0]:
        ids = c["prompt_ids"] + c["token_ids"]
        got = np.asarray(c["routed_experts"], dtype=np.uint8)
        assert c["dtype"] == "uint8" and got.shape == (len(ids) - 1, 3, cfg.num_experts_per_tok)
        assert (got[:, dense] == 0).all()  # the dense layer, never written
        read = from_vllm(got, cfg.n_routed_experts, sample=c["request"]).to_dense()
        assert (read[:, dense] == MISSING).all() and read[:, moe].tolist() == got[:, moe].tolist()
        want = reference_routing(reference, rr, ids)
        for layer in moe:
            top, margin = deepseek_selection(logits[layer], reference.model.layers[layer].mlp.gate, cfg)
            assert torch.equal(top, want[:, layer].long())  # the margins describe transformers' own choice
            decided = margin >= NEAR_TIE
            engine = torch.from_numpy(got[:, layer].astype(np.int64)).sort(-1).values
            differ = (engine != top).any(-1) & decided
            assert not differ.any(), (c["request"], c["index"], layer, differ.nonzero()[:5].flatten().tolist(),
                                      margin[differ][:5].tolist())
            checked += int(decided.sum())
            near += int((~decided).sum())
    # Most routers are decided by more than a near-tie, and every one of those matched exactly.
    assert checked > 1000 and near < 0.1 * (checked + near), (checked, near)
