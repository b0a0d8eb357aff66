"""verl's own FSDP2 engine on the CPU platform (verl_r3.integration.fsdp_cpu).

Each check runs in a fresh interpreter (timeout 300 s) with the CPU platform selected
(VERL_USE_EXTERNAL_MODULES, VERL_PLATFORM=cpu) and a world-size-1 gloo process group on
loopback. The engine is built as verl's TrainingWorker builds it: HFModelConfig,
FSDPEngineConfig (strategy fsdp2), FSDPOptimizerConfig and CheckpointConfig handed to
``EngineRegistry.new``; the batch is a rollout-shaped batch (left-padded prompts, right-padded
responses, ``routed_experts``) converted by verl's ``left_right_2_no_padding`` as verl's
trainer does before ``compute_log_prob`` / ``update_actor``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl")
pytest.importorskip("tokenizers")

from cpu_verl import run_cpu_verl  # noqa: E402

TIMEOUT_S = 300

_BODY = r'''
import json, os, sys, tempfile
import torch

import verl  # imports the CPU platform through VERL_USE_EXTERNAL_MODULES
from verl.utils.device import get_device_name
from verl.workers.engine import EngineRegistry
from verl_r3.integration.fsdp_cpu import register_cpu_engines

try:  # verl alone registers its FSDP engine for cuda/npu only
    EngineRegistry.get_engine_cls("language_model", "fsdp2")
    unregistered_error = None
except ValueError as e:
    unregistered_error = str(e)
first = register_cpu_engines()
second = register_cpu_engines()  # idempotent: the registry would assert on a duplicate key

from tensordict import TensorDict
from transformers import AutoModelForCausalLM

from verl.utils import tensordict_utils as tu
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import engine_harness as H

PARAMS = json.loads(os.environ["CASE"])
tmp, cfg, hf_tok = H.model_dir()
# the engine, built as verl's TrainingWorker builds it (fp32 fsdp2; see engine_harness)
engine_cls = EngineRegistry.get_engine_cls("language_model", "fsdp2")
engine = H.engine(tmp, remove_padding=True, mbs=PARAMS["mbs"], max_tokens=PARAMS["max_tokens"],
                  dynamic=PARAMS["dynamic"], lr=1e-2)

# Record what each micro-batch carries into forward_step (where verl calls the model).
seen = []
_forward_step = engine.forward_step
def _spy(micro_batch, loss_function, forward_only):
    routed = micro_batch.get("routed_experts", None)
    seen.append({
        "forward_only": bool(forward_only),
        "keys": sorted(micro_batch.keys()),
        "n": int(micro_batch.batch_size[0]),
        "routed_nested": bool(routed is not None and routed.is_nested),
        "routed_offsets_match": bool(routed is not None and torch.equal(routed.offsets(), micro_batch["input_ids"].offsets())),
        "routed_values_shape": list(routed.values().shape) if routed is not None else None,
        "routed_dtype": str(routed.dtype) if routed is not None else None,
    })
    return _forward_step(micro_batch, loss_function, forward_only)
engine.forward_step = _spy

# --- a rollout-shaped batch: left-padded prompts, right-padded responses -----------------------
g = torch.Generator().manual_seed(1)
prompt_lens, resp_lens = PARAMS["prompt_lens"], PARAMS["resp_lens"]
B, P, R = len(prompt_lens), max(prompt_lens), max(resp_lens)
pad = hf_tok.pad_token_id
prompts = torch.full((B, P), pad)
responses = torch.full((B, R), pad)
attention_mask = torch.zeros(B, P + R, dtype=torch.long)
seqs = []
for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
    ids = torch.randint(3, 256, (p + r,), generator=g)
    seqs.append(ids)
    prompts[i, P - p:] = ids[:p]
    responses[i, :r] = ids[p:]
    attention_mask[i, P - p:P + r] = 1
position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
L, K = cfg.num_hidden_layers, cfg.num_experts_per_tok
routed = (torch.randint(0, cfg.num_experts, (B, P + R, L, K), generator=g)
          * attention_mask[:, :, None, None]).to(torch.int16)
td = TensorDict({
    "prompts": prompts, "responses": responses,
    "input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention_mask,
    "position_ids": position_ids, "response_mask": attention_mask[:, P:].clone(),
    "routed_experts": routed,
}, batch_size=[B])
td = left_right_2_no_padding(td)
batch_keys = sorted(td.keys())
batch_routed = td["routed_experts"]
tu.assign_non_tensor(
    td, temperature=1.0, use_remove_padding=True, use_dynamic_bsz=PARAMS["dynamic"],
    max_token_len_per_gpu=PARAMS["max_tokens"], micro_batch_size_per_gpu=PARAMS["mbs"],
    use_fused_kernels=False, calculate_entropy=True, compute_loss=False,
)

# --- log-probs (forward only, no loss function), as compute_log_prob runs them -------------------
with engine.eval_mode():
    out = engine.infer_batch(td, loss_function=None)
log_probs = out["model_output"]["log_probs"]
entropy = out["model_output"]["entropy"]

ref = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager").eval()
max_diff, max_ent_diff, lengths_ok = 0.0, 0.0, True
with torch.no_grad():
    for i, ids in enumerate(seqs):
        logits = ref(ids.unsqueeze(0)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        expect = logp[:-1].gather(-1, ids[1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)
        lengths_ok &= log_probs[i].numel() == ids.numel()
        # the last position's "next token" is the following sample's first token: not a log-prob
        max_diff = max(max_diff, (log_probs[i][:-1] - expect).abs().max().item())
        max_ent_diff = max(max_ent_diff, (entropy[i] - ent).abs().max().item())
del ref

# --- one training step (forward_backward_batch with backward, optimizer_step) ----------------
def loss_fn(model_output, data, dp_group=None):
    resp_lp = no_padding_2_padding(model_output["log_probs"], data)  # (bsz, max_response_len)
    mask = data["response_mask"].to(resp_lp.dtype)
    loss = -(resp_lp * mask).sum() / data["batch_num_tokens"]
    return loss, {"nll": loss.detach().item()}

def full_state():
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in engine.module.state_dict().items()}

before = full_state()
tu.assign_non_tensor(td, compute_loss=True, calculate_entropy=False)
with engine.train_mode():
    train_out = engine.train_batch(td, loss_function=loss_fn)
after = full_state()
changed = sum(int(not torch.equal(before[k], after[k])) for k in before)
tu.assign_non_tensor(td, compute_loss=False)
with engine.eval_mode():
    log_probs_after = engine.infer_batch(td, loss_function=None)["model_output"]["log_probs"]

def response_logp(lp):
    return sum(lp[i][p - 1:p + r - 1].sum().item() for i, (p, r) in enumerate(zip(prompt_lens, resp_lens)))

print("RESULT " + json.dumps({
    "device": get_device_name(), "unregistered_error": unregistered_error,
    "registered_first": sorted(map(list, first)), "registered_second": sorted(map(list, second)),
    "cpu_cls_is_verls": [second[("language_model", "fsdp2")] is FSDPEngineWithLMHead,
                         second[("language_model", "fsdp")] is FSDPEngineWithLMHead],
    "engine_cls": engine_cls.__name__, "engine_type": type(engine).__name__,
    "module_type": type(engine.module).__name__,
    "batch_keys": batch_keys,
    "batch_routed_nested": bool(batch_routed.is_nested),
    "batch_routed_matches": all(
        torch.equal(batch_routed[i], routed[i][attention_mask[i].bool()]) for i in range(B)),
    "seen": seen,
    "log_probs_nested": bool(log_probs.is_nested), "lengths_ok": bool(lengths_ok),
    "max_diff": max_diff, "max_entropy_diff": max_ent_diff,
    "changed": changed, "n_tensors": len(before),
    "grad_norm": float(train_out["metrics"]["grad_norm"]),
    "logp_before": response_logp(log_probs), "logp_after": response_logp(log_probs_after),
}))
'''


def _run(params: dict) -> dict:
    return run_cpu_verl(_BODY, params, TIMEOUT_S)


PROMPT_LENS, RESP_LENS = [3, 5, 2], [4, 2, 6]


@pytest.fixture(scope="module")
def packed_run() -> dict:
    # all three samples in one micro-batch: one packed row, so attention must stay per-sequence
    return _run({"dynamic": False, "mbs": 3, "max_tokens": 64, "prompt_lens": PROMPT_LENS, "resp_lens": RESP_LENS})


def test_register_cpu_engines_registers_verls_classes_idempotently(packed_run):
    out = packed_run
    expected = [["language_model", "fsdp"], ["language_model", "fsdp2"], ["value_model", "fsdp"], ["value_model", "fsdp2"]]
    assert out["registered_first"] == expected and out["registered_second"] == expected
    assert out["cpu_cls_is_verls"] == [True, True]
    assert out["device"] == "cpu"
    assert "No engine registered for device='cpu'" in (out["unregistered_error"] or "")
    assert out["engine_cls"] == out["engine_type"] == "FSDPEngineWithLMHead"
    assert out["module_type"].startswith("FSDP")  # FSDP2's fully_shard class swap


def test_fsdp2_log_probs_match_transformers_exactly_fp32(packed_run):
    out = packed_run
    assert out["log_probs_nested"] and out["lengths_ok"]
    assert out["max_diff"] < 1e-5, out["max_diff"]
    assert out["max_entropy_diff"] < 1e-4, out["max_entropy_diff"]
    # one packed micro-batch of all samples (forward-only), then the training step's one
    inference = [s for s in out["seen"] if s["forward_only"]]
    assert [s["n"] for s in inference] == [3, 3]


def test_routed_experts_reach_the_micro_batch_jagged(packed_run):
    out = packed_run
    assert "routed_experts" in out["batch_keys"] and out["batch_routed_nested"] and out["batch_routed_matches"]
    total = sum(PROMPT_LENS) + sum(RESP_LENS)
    for s in out["seen"]:
        for key in ("input_ids", "position_ids", "loss_mask", "routed_experts", "temperature", "use_remove_padding"):
            assert key in s["keys"], (key, s["keys"])
        assert s["routed_nested"] and s["routed_offsets_match"]
        assert s["routed_values_shape"] == [total, 3, 2] and s["routed_dtype"] == "torch.int16"


def test_fsdp2_training_step_updates_parameters(packed_run):
    out = packed_run
    assert [s["forward_only"] for s in out["seen"]].count(False) == 1
    assert out["changed"] == out["n_tensors"] > 0
    assert out["grad_norm"] > 0
    # one step of gradient ascent on the responses' log-likelihood raises it
    assert out["logp_after"] > out["logp_before"]


def test_fsdp2_dynamic_batch_size_splits_and_restores_order():
    # verl's actor default: token-budget micro-batches, rearranged and put back in order
    out = _run({"dynamic": True, "mbs": 1, "max_tokens": 12, "prompt_lens": PROMPT_LENS, "resp_lens": RESP_LENS})
    inference = [s for s in out["seen"] if s["forward_only"]]
    assert len(inference) >= 2 * 2  # two infer passes, each in several micro-batches
    assert out["max_diff"] < 1e-5 and out["lengths_ok"]
    for s in out["seen"]:
        assert s["routed_nested"] and s["routed_offsets_match"]
    assert out["changed"] == out["n_tensors"] and out["logp_after"] > out["logp_before"]
