"""Bad input, through the public API and through the verl integration.

Every case ends in a clear error that names the sample and the cause, or in the documented
per-token fallback, counted (``rr.stats``, ``r3/fallback_frac``) and, in verl, logged with the
sample named. The routing-shaped defects are the table in ``bad_input_cases.py``; the verl side
of it runs verl's own FSDP2 engine (``FSDPReplayEngine``, R3) in one fresh interpreter, and the
public side ``RouterReplay`` / ``RoutingRecord`` / ``formats`` in this one. The rest (multi-turn
offsets, engines without capture or too old, unsupported and dense models, two model instances)
are one test each below, both paths in each.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
sys.path.insert(0, HERE)

import bad_input_cases as C  # noqa: E402

from verl_r3 import MISSING, RouterReplay, RoutingRecord  # noqa: E402
from verl_r3.core import formats  # noqa: E402
from verl_r3.tiny import tiny_model  # noqa: E402

TIMEOUT_S = 300
EXPERTS = 8


# --------------------------------------------------------------------------- public API


@pytest.fixture(scope="module")
def public():
    """Tiny Qwen3-MoE (layer 1 dense), RouterReplay bound, 3 sequences of 10 tokens and their own
    routing as per-sample rows."""
    model = tiny_model("qwen3_moe", num_experts=EXPERTS)
    rr = RouterReplay(model)
    ids = torch.randint(3, 256, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), rr.record() as rec:
        model(input_ids=ids)
    return model, rr, ids, list(rec.routed_experts)


@pytest.mark.parametrize("name", list(C.CASES))
def test_public_api(public, name):
    model, rr, ids, own = public
    case = C.CASES[name]
    rows = case.defect([r.clone() for r in own], EXPERTS)

    def run():
        if case.public_via == "records":
            records = [RoutingRecord.from_dense(r, EXPERTS, sample=i) for i, r in enumerate(rows)]
            batch = formats.to_verl_batch(records, torch.ones(ids.shape, dtype=torch.long), pad=MISSING)
        else:
            batch = torch.stack(rows)
        with torch.no_grad(), rr.replay(batch):
            model(input_ids=ids)

    if isinstance(case.public, C.Error):
        with pytest.raises(ValueError, match=case.public.pattern):
            run()
        return
    run()
    fallback = sum(int(m.sum()) for m in C.missing_pairs(rows, rr.moe_layers))
    assert fallback > 0
    assert rr.stats["fallback"] == fallback
    assert rr.stats["replayed"] == ids.numel() * len(rr.moe_layers) - fallback


def test_dtype_too_small_for_the_expert_count():
    model = tiny_model("qwen3_moe", num_experts=300)
    rr = RouterReplay(model)
    with pytest.raises(ValueError, match="int8 is too small for 300 experts"):
        with rr.replay(torch.zeros(1, 4, 3, 2, dtype=torch.int8)):
            pass
    with pytest.raises(ValueError, match=r"ids dtype torch.uint8 does not match 300 experts"):
        RoutingRecord(torch.zeros(4, 3, 2, dtype=torch.uint8), None, 300)
    from verl_r3.integration.fsdp_replay import micro_batch_routing  # the engine's narrowing, per sample

    values = torch.tensor([[[3, 7]], [[200, 4]]], dtype=torch.uint8)
    routed = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 1, 2]))
    tokens = torch.nested.nested_tensor_from_jagged(torch.zeros(2, dtype=torch.long), offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="sample 1 holds expert id 200, more than a model with 128 or fewer"):
        micro_batch_routing(routed, tokens, remove_padding=True, dtype=torch.int8)


# --------------------------------------------------------------------------- verl's FSDP engine

_BODY = r'''
import json, logging, os
import torch
import verl  # loads the CPU platform (VERL_USE_EXTERNAL_MODULES)

import bad_input_cases as C
import engine_harness as H
from verl_r3 import RouterReplay
from verl_r3.core.record import compact_rows
from verl_r3.integration.step_metrics import phase_problems, step_figures, take_stats

prompt_lens, resp_lens = [4, 5, 3], [5, 3, 6]
path, cfg, tok, seqs, hf, _ = H.replay_setup(prompt_lens, resp_lens)
rr = RouterReplay(hf)
own = []
for ids in seqs:
    with torch.no_grad(), rr.record() as rec:
        hf(input_ids=ids[None])
    own.append(rec.routed_experts[0, :-1].clone())  # what an engine returns: n - 1 rows
moe = sorted(rr.moe_layers)
# Response tokens with a routing row (each sample's last token has none), per sample over its rows.
response = [torch.arange(len(s)) >= p for s, p in zip(seqs, prompt_lens)]
response = [m[:-1] for m in response]

warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("verl_r3.integration.fsdp_replay").addHandler(Keep())

def carried(rows):
    """The routing as verl's agent loop with verl_r3's patch carries it: each sample's rows laid over
    its tokens, rows the engine did not return zero (a sample without routing: all zero), the whole
    compacted (uint8 where every id fits)."""
    blocks = []
    for s, r in zip(seqs, rows):
        r = torch.where((r == -1).all(-1, keepdim=True), torch.zeros_like(r), r)
        block = torch.zeros((max(len(s), r.shape[0]), *r.shape[1:]), dtype=torch.int16)
        block[: r.shape[0]] = r
        blocks.append(block)
    offsets = torch.tensor([0, *torch.tensor([b.shape[0] for b in blocks]).cumsum(0).tolist()])
    return torch.nested.nested_tensor_from_jagged(compact_rows(torch.cat(blocks)), offsets=offsets)

def infer(eng, routed):
    td = H.rollout_batch(seqs, prompt_lens, tok.pad_token_id, remove_padding=eng.rmpad)
    if routed is not None:
        td["routed_experts"] = routed
    with eng.eval_mode():
        return eng.infer_batch(td, loss_function=None)

def outcome(eng, routed):
    warnings.clear()
    try:
        out = infer(eng, routed)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    totals = take_stats(out["metrics"]).get("infer", {})
    return {"figures": step_figures(totals, {}), "problems": phase_problems("compute_log_prob", totals),
            "warnings": list(warnings), "replay_stats": dict(eng.router_replay_stats)}

eng = H.engine(path, mode="R3")
padded = H.engine(path, mode="R3", remove_padding=False)  # verl's padded layout: the same outcomes
eng.rmpad, padded.rmpad = True, False
result = {"cases": {}, "padded": {}, "moe": moe, "response_pairs": int(sum(m.sum() for m in response)) * len(moe)}
for name, case in C.CASES.items():
    rows = case.defect([r.clone() for r in own], cfg.num_experts)
    missing = C.missing_pairs(rows, moe, [len(s) - 1 for s in seqs])
    for key, engine in (("cases", eng), ("padded", padded)):
        got = outcome(engine, carried(rows))
        got["expected_response_pairs"] = int(sum((m & r[:, None]).sum() for m, r in zip(missing, response)))
        got["expected_tokens"] = [int(m.any(-1).sum()) for m in missing]
        result[key][name] = got
result["own"] = outcome(eng, carried(own))
result["no_routing"] = outcome(eng, None)

# Two model instances in one process: a second R3 engine replaying other routing binds to its own
# model; each engine's replay follows its own batch.
other_rows = [(r + 1) % cfg.num_experts for r in own]  # another expert set for every token (dense layers masked)
second = H.engine(path, mode="R3")
second.rmpad = True
result["two_engines"] = {
    "bound_to_own_module": [eng._rr.model is eng.module, second._rr.model is second.module,
                            eng._rr.model is not second._rr.model],
    "first": outcome(eng, carried(own)), "second": outcome(second, carried(other_rows)),
}

# Replay enabled on a model without MoE, and on a family verl_r3 does not support.
for label, kw in (("dense_moe_family", {"mlp_only_layers": [0, 1, 2]}),):
    dense_path, _, _ = H.model_dir(**kw)
    try:
        H.engine(dense_path, mode="R3")
        result[label] = None
    except Exception as exc:
        result[label] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(result))
'''


@pytest.fixture(scope="module")
def verl_results():
    pytest.importorskip("verl")
    from cpu_verl import run_cpu_verl

    return run_cpu_verl(_BODY, {}, TIMEOUT_S, paths=(HERE,))


@pytest.mark.parametrize("layout", ["cases", "padded"], ids=["remove-padding", "padded"])
@pytest.mark.parametrize("name", list(C.CASES))
def test_verl_integration(verl_results, name, layout):
    case, got = C.CASES[name], verl_results[layout][name]
    if isinstance(case.verl, C.Error):
        assert "error" in got, got
        assert got["error"].startswith("ValueError: ") and ("sample 1" in got["error"]) == case.names_sample, got
        assert re.search(case.verl.pattern, got["error"]), got["error"]
        return
    assert "error" not in got, got["error"]
    # Counted: r3/fallback_frac over (response token, MoE layer) pairs, the rest replayed.
    figures = got["figures"]
    assert figures["r3/fallback_frac"] == pytest.approx(got["expected_response_pairs"] / verl_results["response_pairs"])
    assert figures["r3/replay_active_frac"] + figures["r3/fallback_frac"] == pytest.approx(1.0)
    if isinstance(case.verl, C.Problem):
        assert len(got["problems"]) == 1 and re.search(case.verl.pattern, got["problems"][0]), got
    else:
        assert got["problems"] == []
    # Logged once per call, naming each sample with tokens that ran natively and how many.
    [warning] = [w for w in got["warnings"] if "without rollout routing" in w]
    named = dict(re.findall(r"(\d+): (\d+)", warning.split("Tokens per sample: ")[1]))
    expected = {str(i): str(n) for i, n in enumerate(got["expected_tokens"]) if n}
    assert named == expected and "1" in named, (warning, expected)


def test_verl_integration_without_defects_replays_everything(verl_results):
    own = verl_results["own"]
    assert own["figures"]["r3/replay_active_frac"] == 1.0 and own["figures"]["r3/fallback_frac"] == 0.0
    assert own["problems"] == [] and not [w for w in own["warnings"] if "without rollout routing" in w]
    assert "routed_experts" in verl_results["no_routing"]["error"]
    assert "enable_rollout_routing_replay=True" in verl_results["no_routing"]["error"]


# --------------------------------------------------------------------------- the other cases


def test_multi_turn_offsets_that_overlap_or_leave_gaps():
    from verl_r3.patches.verl_tool_agent_loop_0_9 import stitch_turn

    whole = torch.stack([torch.randperm(8)[:2] for _ in range(3 * 12)]).view(12, 3, 2).to(torch.int16)
    first = RoutingRecord.from_dense(whole[:6], EXPERTS)
    with pytest.raises(ValueError, match=r"turn starts at row 8 but the record ends at row 6.*gap"):
        first.stitch(RoutingRecord.from_dense(whole[8:], EXPERTS, start=8))
    changed = whole.clone()
    changed[5, 0] = (changed[5, 0] + 1) % 8
    with pytest.raises(ValueError, match=r"turn overlaps the record at row 5, layer 0 with different experts"):
        first.stitch(RoutingRecord.from_dense(changed[4:], EXPERTS, start=4))
    # verl's tool agent loop (patched): a turn's rows returned from an offset must start where the
    # earlier turns' rows end; the error names the request and the turn.
    recorded, tokens = whole[:6].numpy(), list(range(7))
    prompt = tokens + [50, 51, 52]  # the next turn's prompt: the conversation so far plus a tool response
    sample = "request r7 (assistant turn 2)"
    with pytest.raises(ValueError, match=r"request r7 \(assistant turn 2\): .*gap between turns"):
        stitch_turn(recorded, tokens, prompt, [60, 61], whole[8:11].numpy(), sample=sample)
    with pytest.raises(ValueError, match=r"request r7 \(assistant turn 2\): .*overlapping turns"):
        stitch_turn(recorded, tokens, prompt, [60, 61], whole[4:11].numpy(), sample=sample)
    stitched = stitch_turn(recorded, tokens, prompt, [60, 61], whole[6:11].numpy(), sample=sample)
    assert np.array_equal(stitched, whole[:11].numpy())


def test_engines_started_without_capture_or_too_old():
    from verl_r3.engines import sglang_engine, vllm_engine

    completion = vllm_engine.Completion(request=3, index=0, prompt_ids=[1, 2], token_ids=[5], routed_experts=None)
    with pytest.raises(ValueError, match=r"request 3 sample 0: the engine returned no routing \(capture off\?\)"):
        completion.record(EXPERTS)
    with pytest.raises(ValueError, match="sample 4: SGLang output has no routed_experts: start the engine with "
                                         "enable_return_routed_experts=True"):
        sglang_engine.routing_record({}, num_layers=3, top_k=2, num_experts=EXPERTS, sample=4)
    # Too old: the capture patches refuse engines outside their version window by name; verl's own
    # server refuses R3 on vLLM < 0.22 (vllm_async_server), SGLang's capture starts at 0.5.x.
    from verl_r3.patches import sglang_cpu_0_5, vllm_cpu_capture_0_32
    from verl_r3.patches._window import check_window

    for patch, dist, old in ((vllm_cpu_capture_0_32, "vllm", "0.31.2"), (sglang_cpu_0_5, "sglang", "0.5.9")):
        with pytest.raises(RuntimeError, match=rf"{patch.__name__.rsplit('.', 1)[1]} supports {dist} "
                                               rf"{patch.SUPPORTED}, found {dist} {old}"):
            check_window(patch.__name__.rsplit(".", 1)[1], dist, old, patch.SUPPORTED, "upgrade")
    # Through verl (R3 with an engine that returns no routing): test_verl_integration_without_defects...


def test_unsupported_family_and_replay_on_a_dense_model(verl_results):
    import transformers

    dense = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match=r"'qwen3' is not a supported MoE family \(supported: .*qwen3_moe.*\); "
                                         r"a dense model has nothing to replay"):
        RouterReplay(dense)
    with pytest.raises(ValueError, match="qwen3_moe model has no MoE layer"):
        RouterReplay(tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2]))
    # verl's engine with router_replay.mode=R3 on such a model fails when it is built, naming why.
    assert "ValueError" in verl_results["dense_moe_family"] and "has no MoE layer" in verl_results["dense_moe_family"]


def test_two_model_instances_in_one_process(public, verl_results):
    model, rr, ids, own = public
    twin = tiny_model("qwen3_moe", num_experts=EXPERTS, seed=1)
    with pytest.raises(RuntimeError, match="no forward of the bound model ran inside the block"):
        with torch.no_grad(), rr.replay(torch.stack(own)):
            twin(input_ids=ids)
    two = verl_results["two_engines"]
    assert two["bound_to_own_module"] == [True, True, True]
    for side in ("first", "second"):
        figures = two[side]["figures"]
        assert figures["r3/replay_active_frac"] == 1.0 and figures["r3/router_disagree_replayed"] == 0.0, side
    # The second engine replayed routing that is not its model's own choice; the first replayed its own.
    assert two["first"]["figures"]["r3/router_disagree"] == 0.0 < two["second"]["figures"]["r3/router_disagree"]


# --------------------------------------------------------------------------- verl's agent loop


def _agent_output(routed, prompt=4, response=5):
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    return AgentLoopOutput(prompt_ids=list(range(3, 3 + prompt)), response_ids=list(range(9, 9 + response)),
                           response_mask=[1] * response, routed_experts=routed, metrics=AgentLoopMetrics())


def _agent_worker(top_k=2):
    from omegaconf import OmegaConf

    from verl_r3.tiny import tiny_config

    return types.SimpleNamespace(
        config=OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": "fsdp2"}}}),
        rollout_config=types.SimpleNamespace(enable_rollout_routing_replay=True),
        model_config=types.SimpleNamespace(hf_config=tiny_config("qwen3_moe", num_experts_per_tok=top_k)))


@pytest.mark.parametrize("legacy", [False, True], ids=["v1", "legacy"])
def test_agent_loop_names_routing_longer_than_its_sample_and_logs_samples_without_routing(legacy, caplog):
    pytest.importorskip("verl")
    from verl_r3.patches import verl_agent_loop_routing_0_9 as patch

    seen = []

    async def verls_postprocess(self, output, validate, **kwargs):  # what verl runs next
        seen.extend(output)

    wrapped = patch._checking(verls_postprocess, legacy=legacy)
    rows = np.stack([np.random.default_rng(i).permutation(8)[:2] for i in range(8 * 3)]).reshape(8, 3, 2)
    long = np.concatenate([rows, rows[:3]])  # 11 rows for 9 tokens
    with pytest.raises(ValueError, match=r"sample u7_1_1: routing has 11 rows but the sample has 9 tokens"):
        asyncio.run(wrapped(_agent_worker(), [_agent_output(rows), _agent_output(long)], False, uid="u7",
                            session_id=1))
    seen.clear()
    with caplog.at_level(logging.WARNING, logger=patch.__name__):
        asyncio.run(wrapped(_agent_worker(), [_agent_output(rows), _agent_output(None)], False, uid="u7",
                            session_id=1))
    assert "sample u7_1_1: the rollout engine returned no routing; its 9 tokens take the fallback" in caplog.text
    empty = seen[1].routed_experts
    assert tuple(empty.shape) == (0, 3, 2)  # verl's alignment zero-fills it: every row missing
    aligned = seen[1].as_dict()["routed_experts"] if not legacy else None
    if aligned is not None:
        assert aligned.shape == (9, 3, 2) and (aligned == 0).all()
    # Top-1: a zero row is expert 0, so rows the engine did not return are padded with -1 (v1) or refused (legacy).
    top1 = rows[:5, :, :1]
    if legacy:
        with pytest.raises(ValueError, match=r"sample u7_1_0: top-1 routing covers 5 of 9 tokens"):
            asyncio.run(wrapped(_agent_worker(top_k=1), [_agent_output(top1)], False, uid="u7", session_id=1))
    else:
        seen.clear()
        asyncio.run(wrapped(_agent_worker(top_k=1), [_agent_output(top1)], False, uid="u7", session_id=1))
        carried = seen[0].routed_experts
        assert carried.dtype == torch.int16 and carried.shape == (9, 3, 1)
        assert carried[:5].numpy().tolist() == top1.tolist() and (carried[5:] == -1).all()
