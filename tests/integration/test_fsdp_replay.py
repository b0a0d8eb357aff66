"""Router replay in verl's FSDP2 engine (verl_r3.integration.fsdp_replay), on the CPU platform.

Each case runs in a fresh interpreter (timeout 300 s) and compares the engine with
``verl_r3.RouterReplay`` on the Hugging Face model holding the same weights.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl")

from cpu_verl import run_cpu_verl  # noqa: E402

TIMEOUT_S = 300

_BODY = r'''
import copy, json, os
import torch
import verl  # loads the CPU platform (VERL_USE_EXTERNAL_MODULES)
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

import engine_harness as H
from verl_r3 import MISSING, RouterReplay
from verl_r3.core.metrics import logprob_mismatch
from verl_r3.integration.step_metrics import step_figures, take_stats

P = json.loads(os.environ["CASE"])
prompt_lens, resp_lens = [3, 5, 2], [4, 2, 6]
path, cfg, tok, seqs, hf, g = H.replay_setup(prompt_lens, resp_lens)
# "Rollout" routing: recorded on a copy whose routers were perturbed, so it differs from the trainer's.
other = copy.deepcopy(hf)
with torch.no_grad():
    for name, p in other.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.add_(torch.randn(p.shape, generator=g) * 3 * p.std())
rr_other = RouterReplay(other)
rollout, rollout_lp = [], []
for ids, p in zip(seqs, prompt_lens):
    with torch.no_grad(), rr_other.record() as rec:
        logits = other(input_ids=ids[None]).logits[0]
    rollout.append(rec.routed_experts[0, :-1])  # engine convention: n - 1 rows
    lp = torch.log_softmax(logits.float(), -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)[p - 1:]
    # Rollout log-probs further off than the routing alone makes them, so that every F(tau) is exercised.
    rollout_lp.append(lp + torch.randn(lp.shape, generator=g) * 1.5)

rr = RouterReplay(hf)
def hf_log_probs(ids, routed_rows=None):
    with torch.no_grad():
        if routed_rows is None:
            logits = hf(input_ids=ids[None]).logits[0]
        else:
            full = torch.cat([routed_rows, torch.full_like(routed_rows[:1], MISSING)])[None]
            with rr.replay(full):
                logits = hf(input_ids=ids[None]).logits[0]
    return torch.log_softmax(logits.float(), -1)[:-1].gather(-1, ids[1:, None]).squeeze(-1)

def engine_log_probs(eng, routed):
    td = H.rollout_batch(seqs, prompt_lens, tok.pad_token_id, routed=routed, remove_padding=P["rmpad"],
                         dynamic=P["dynamic"], max_tokens=12 if P["dynamic"] else 64,
                         rollout_log_probs=rollout_lp if P.get("rollout_lp") else None)
    with eng.eval_mode():
        out = eng.infer_batch(td, loss_function=None)
    return td, out

def max_diff(lp, refs):
    return max((lp[i][:-1] - ref).abs().max().item() for i, ref in enumerate(refs))

def r3_metrics(out):
    """The r3/ figures the trainer logs, from the counts the engine adds to verl's metrics."""
    stats = take_stats(out["metrics"])
    assert not any(k.startswith("r3") for k in out["metrics"]), out["metrics"].keys()
    return step_figures(stats.get("infer", {}), stats.get("update", {}))

def expected_disagreement(replay):
    """Share of (response token with routing, MoE layer) pairs, over all samples, where the
    trainer's own routing differs from the rollout's. Under replay the trainer's own choice in
    a layer follows the replayed layers before it."""
    differ = pairs = 0
    for ids, p, rows in zip(seqs, prompt_lens, rollout):
        if replay:
            full = torch.cat([rows, torch.full_like(rows[:1], MISSING)])[None]
            with torch.no_grad(), rr.replay(full) as h:
                hf(input_ids=ids[None])
            own = h.native_experts
        else:
            with torch.no_grad(), rr.record() as rec:
                hf(input_ids=ids[None])
            own = rec.routed_experts
        native = own[0, p:len(ids) - 1][:, sorted(rr.moe_layers)]
        theirs = rows[p:][:, sorted(rr.moe_layers)]
        differ += int((native.sort(-1).values != theirs.sort(-1).values).any(-1).sum())
        pairs += native.shape[0] * native.shape[1]
    return differ / pairs

def expected_k3(replay):
    """k3 KL of the rollout log-probs against the trainer's (replayed or native) over all response tokens."""
    train = torch.cat([hf_log_probs(ids, r if replay else None)[p - 1:] for ids, r, p in
                       zip(seqs, rollout, prompt_lens)])
    rollout_all = torch.cat(rollout_lp)
    return logprob_mismatch(rollout_all, train, torch.ones_like(train, dtype=torch.bool))

result = {}
if P["mode"] == "R3":
    eng = H.engine(path, remove_padding=P["rmpad"], mode="R3", dynamic=P["dynamic"],
                   max_tokens=12 if P["dynamic"] else 64)
    result["engine"] = type(eng).__name__
    td, out = engine_log_probs(eng, rollout)
    lp = out["model_output"]["log_probs"]
    result["diff_replay"] = max_diff(lp, [hf_log_probs(ids, r) for ids, r in zip(seqs, rollout)])
    result["diff_native"] = max_diff(lp, [hf_log_probs(ids) for ids in seqs])
    result["stats"] = dict(eng.router_replay_stats)
    result["metrics"] = r3_metrics(out)
    result["expected_disagree"] = expected_disagreement(replay=True)
    result["expected_k3"] = expected_k3(replay=True)
    # One update under replay: parameters change, routers included.
    def loss_fn(model_output, data, dp_group=None):
        resp = no_padding_2_padding(model_output["log_probs"], data)
        loss = -(resp * data["response_mask"].to(resp.dtype)).sum() / data["batch_num_tokens"]
        return loss, {}
    before = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
              for k, v in eng.module.state_dict().items()}
    tu.assign_non_tensor(td, compute_loss=True)
    with eng.train_mode():
        eng.train_batch(td, loss_function=loss_fn)
    after = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in eng.module.state_dict().items()}
    result["routers_changed"] = all(not torch.equal(before[k], after[k]) for k in before if k.endswith("mlp.gate.weight"))
    result["train_stats"] = dict(eng.router_replay_stats)
    # No routing in the batch: a clear error.
    try:
        engine_log_probs(eng, None)
        result["missing_error"] = None
    except ValueError as exc:
        result["missing_error"] = str(exc)
elif P["mode"] == "R2":
    eng = H.engine(path, remove_padding=P["rmpad"], mode="R2")
    td, out = engine_log_probs(eng, None)
    recorded = out["model_output"]["routed_experts"]
    same = []
    for i, ids in enumerate(seqs):
        with torch.no_grad(), rr.record() as rec:
            hf(input_ids=ids[None])
        # Carried like the rollout's routing: uint8, the layer without MoE zero (missing) instead of -1.
        same.append(recorded[i].dtype == torch.uint8
                    and torch.equal(recorded[i].to(torch.int16), rec.routed_experts[0].clamp(min=0)))
    result["recorded_equal"] = same
    result["diff_native"] = max_diff(out["model_output"]["log_probs"], [hf_log_probs(ids) for ids in seqs])
elif P["mode"] == "reference":
    # verl's reference model is a forward-only engine; configured with R3 it still never replays.
    eng = H.engine(path, remove_padding=P["rmpad"], mode="R3", forward_only=True)
    td, out = engine_log_probs(eng, rollout)
    result["rr_bound"] = eng._rr is not None
    result["metrics"] = r3_metrics(out)
    result["diff_native"] = max_diff(out["model_output"]["log_probs"], [hf_log_probs(ids) for ids in seqs])
    result["diff_replay"] = max_diff(out["model_output"]["log_probs"],
                                     [hf_log_probs(ids, r) for ids, r in zip(seqs, rollout)])
else:
    eng = H.engine(path, remove_padding=P["rmpad"], mode="disabled")
    td, out = engine_log_probs(eng, None)
    result["rr_bound_without_routing"] = eng._rr is not None
    result["metrics_without_routing"] = r3_metrics(out)
    td, out = engine_log_probs(eng, rollout)
    result["diff_native"] = max_diff(out["model_output"]["log_probs"], [hf_log_probs(ids) for ids in seqs])
    result["metrics"] = r3_metrics(out)
    result["expected_disagree"] = expected_disagreement(replay=False)
    result["expected_k3"] = expected_k3(replay=False)
print("RESULT " + json.dumps(result))
'''


def _run(case: dict) -> dict:
    return run_cpu_verl(_BODY, case, TIMEOUT_S)


@pytest.mark.parametrize("rmpad,dynamic", [(True, False), (False, False), (True, True)],
                         ids=["remove-padding", "padded", "dynamic-bsz"])
def test_r3_engine_log_probs_equal_router_replay_and_update_keeps_router_grads(rmpad, dynamic):
    r = _run({"mode": "R3", "rmpad": rmpad, "dynamic": dynamic, "rollout_lp": True})
    assert r["engine"] == "FSDPReplayEngine"
    assert r["diff_replay"] < 1e-5, r
    assert r["diff_native"] > 1e-3, r  # the rollout routing really differs from the trainer's
    tokens = 7 + 7 + 8
    moe_layers = 2  # tiny qwen3_moe: layer 1 is dense
    assert r["stats"]["forwards"] == 3  # one micro-batch a sample
    assert r["stats"]["replayed"] == (tokens - 3) * moe_layers  # every sample's last token falls back
    assert r["stats"]["fallback"] == 3 * moe_layers and r["stats"]["disagree"] > 0
    assert r["routers_changed"]
    assert r["train_stats"]["replayed"] > 0 and r["train_stats"]["recomputed"] > 0  # checkpoint recompute replayed
    assert "enable_rollout_routing_replay" in r["missing_error"]
    # What the trainer logs (r3/...): every response token with rollout routing was replayed.
    m = r["metrics"]
    assert m["r3/replay_active_frac"] == 1.0 and m["r3/fallback_frac"] == 0.0, m
    assert m["r3/router_disagree_replayed"] == 0.0, m
    assert m["r3/router_disagree"] == pytest.approx(r["expected_disagree"]) and m["r3/router_disagree"] > 0, r
    # k3 KL and F(tau) of the rollout's log-probs against the replayed forward, over every response token.
    assert m["r3/k3_kl"] == pytest.approx(r["expected_k3"]["k3_kl"], rel=1e-5) and m["r3/k3_kl"] > 0, r
    assert 0 < m["r3/extreme_frac_5"] < m["r3/extreme_frac_1.5"] < 1, m
    for tau in ("1.5", "2", "5", "10"):
        assert m[f"r3/extreme_frac_{tau}"] == pytest.approx(r["expected_k3"][f"extreme_frac_{tau}"]), (tau, r)
    layers = {k: v for k, v in m.items() if k.startswith("r3/router_disagree_layer/")}
    assert sorted(layers) == ["r3/router_disagree_layer/00", "r3/router_disagree_layer/02"], m  # layer 1 is dense
    assert m["r3/router_disagree"] == pytest.approx(sum(layers.values()) / 2)  # same pairs in each MoE layer
    assert m["r3/routing_bytes_per_token"] == 2 * 2 * 3  # int16 rows of [3 layers, top-2] as verl carries them


@pytest.mark.parametrize("rmpad", [True, False], ids=["remove-padding", "padded"])
def test_r2_engine_records_the_trainers_own_routing(rmpad):
    r = _run({"mode": "R2", "rmpad": rmpad, "dynamic": False})
    assert r["recorded_equal"] == [True, True, True]
    assert r["diff_native"] < 1e-5


def test_disabled_mode_is_verls_engine_unchanged_and_measures_disagreement():
    r = _run({"mode": "disabled", "rmpad": True, "dynamic": False, "rollout_lp": True})
    # No routing in the batch: no observer is bound; the log-prob mismatch is measured all the same.
    assert r["rr_bound_without_routing"] is False
    assert set(r["metrics_without_routing"]) == {"r3/k3_kl", *(f"r3/extreme_frac_{t}" for t in ("1.5", "2", "5", "10"))}
    assert r["metrics_without_routing"]["r3/k3_kl"] == pytest.approx(r["expected_k3"]["k3_kl"], rel=1e-4)
    assert r["diff_native"] < 1e-5  # native routing: nothing replayed
    m = r["metrics"]  # rollout routing in the batch: the disagreement is measured, not acted on
    assert m["r3/replay_active_frac"] == 0.0, m
    assert m["r3/router_disagree"] == pytest.approx(r["expected_disagree"]) and m["r3/router_disagree"] > 0, r
    assert m["r3/router_disagree_replayed"] == m["r3/router_disagree"]
    assert m["r3/k3_kl"] == pytest.approx(r["expected_k3"]["k3_kl"], rel=1e-4) and m["r3/k3_kl"] > 0


def test_reference_engine_never_replays_even_when_configured():
    r = _run({"mode": "reference", "rmpad": True, "dynamic": False, "rollout_lp": True})
    assert r["rr_bound"] is False and r["metrics"] == {}
    # Its log-probs follow the trainer's own routing, not the rollout's.
    assert r["diff_native"] < 1e-5 and r["diff_replay"] > 1e-3, r
