"""The ``hf`` rollout engine's generator (verl_r3.integration.hf_rollout), in-process.

Its Ray server and replica run inside verl's trainer in test_main_ppo_cpu.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("verl")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import engine_harness as H  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from verl_r3 import RouterReplay  # noqa: E402
from verl_r3.integration.hf_rollout import HFGenerator, Request, fuse_expert_weights  # noqa: E402


@pytest.fixture(scope="module")
def model_path():
    path, _, tok = H.model_dir()
    return path, tok


def _generator(model_path, **kw):
    path, tok = model_path
    return HFGenerator(path, dtype=torch.bfloat16, capture_routing=True, eos_token_ids=[tok.eos_token_id],
                       pad_token_id=tok.pad_token_id, **kw)


def _requests(temperature=1.0, seeds=(11, 12, 13)):
    shapes = [(3, 5), (7, 9), (4, 2)]
    return [Request(prompt_ids=list(range(5 + i, 5 + i + n)), max_tokens=m, temperature=temperature, seed=s)
            for i, ((n, m), s) in enumerate(zip(shapes, seeds))]


def test_batched_generation_returns_the_routing_and_log_probs_of_a_plain_forward(model_path):
    gen = _generator(model_path)
    reqs = _requests()
    results = gen.generate(reqs)
    path, _ = model_path
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                     experts_implementation="eager").eval()
    rr = RouterReplay(ref_model)
    for req, res in zip(reqs, results):
        assert 1 <= len(res.token_ids) <= req.max_tokens and res.stop_reason == "completed"
        seq = torch.tensor([req.prompt_ids + res.token_ids])
        with torch.no_grad(), rr.record() as rec:
            logits = ref_model(input_ids=seq[:, :-1]).logits[0].float()
        # One row per token fed to the model: prompt + response - 1, as vLLM reports it.
        assert res.routed_experts.shape == (seq.shape[1] - 1, rr.num_layers, rr.top_k)
        assert torch.equal(torch.from_numpy(res.routed_experts).to(rec.routed_experts.dtype), rec.routed_experts[0])
        expected = torch.log_softmax(logits, -1)[len(req.prompt_ids) - 1:].gather(
            -1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.log_probs), expected, rtol=0, atol=1e-5)


def test_a_request_samples_the_same_tokens_alone_or_in_any_batch(model_path):
    gen = _generator(model_path)
    reqs = _requests()
    together = gen.generate(reqs)
    alone = [gen.generate([r])[0] for r in reversed(reqs)][::-1]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    other_seed = gen.generate(_requests(seeds=(21, 22, 23)))
    assert [r.token_ids for r in other_seed] != [r.token_ids for r in together]


def test_greedy_and_top_k_1_pick_the_argmax(model_path):
    gen = _generator(model_path)
    greedy = gen.generate(_requests(temperature=0.0))
    top1 = gen.generate([Request(prompt_ids=r.prompt_ids, max_tokens=r.max_tokens, top_k=1, seed=r.seed + 100)
                         for r in _requests()])
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1]


def test_generation_stops_at_eos_unless_ignored(model_path):
    path, tok = model_path
    probe = _generator(model_path).generate(_requests(temperature=0.0))[1]
    stop_id = probe.token_ids[1]  # make the second greedy token an EOS
    gen = HFGenerator(path, dtype=torch.bfloat16, eos_token_ids=[stop_id], pad_token_id=tok.pad_token_id)
    req = _requests(temperature=0.0)[1]
    assert gen.generate([req])[0].token_ids == probe.token_ids[:2]
    req.ignore_eos = True
    assert len(gen.generate([req])[0].token_ids) == req.max_tokens


def test_weight_sync_fuses_verls_per_expert_tensors_exactly(model_path):
    from verl.workers.engine.fsdp.utils import unfuse_moe_params

    path, _ = model_path
    trained = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sent = list(unfuse_moe_params(trained.state_dict().items()))
    assert any(".experts.0.gate_proj.weight" in name for name, _ in sent)  # verl's per-expert keys
    gen = HFGenerator(path, dtype=torch.float32)
    assert gen.load_weights(sent) == len(dict(gen.model.named_parameters()))
    for name, param in gen.model.named_parameters():
        assert torch.equal(param, trained.get_parameter(name)), name


def test_weight_sync_names_unknown_and_missing_tensors(model_path):
    path, _ = model_path
    gen = HFGenerator(path, dtype=torch.float32)
    params = dict(gen.model.named_parameters())
    named = list(params.items())
    with pytest.raises(ValueError, match="match no rollout parameter.*lm_head.bias"):
        fuse_expert_weights(named + [("lm_head.bias", torch.zeros(3))], params)
    with pytest.raises(ValueError, match="were not sent.*lm_head.weight"):
        fuse_expert_weights([(n, t) for n, t in named if n != "lm_head.weight"], params)
    with pytest.raises(ValueError, match="shape mismatch.*lm_head.weight"):
        fuse_expert_weights([(n, t[:1] if n == "lm_head.weight" else t) for n, t in named], params)
