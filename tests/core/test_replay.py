"""RouterReplay on every supported family (runs on transformers 5.19 and on 5.10.x)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from verl_r3 import MISSING, RouterReplay
from verl_r3.core.metrics import router_disagreement
from verl_r3.tiny import FAMILIES, tiny_model

CASES = [(family, 8) for family in FAMILIES] + [("qwen3_moe", 300)]
IDS = [f"{f}-E{e}" for f, e in CASES]


def _model(family, experts, seed=0):
    return tiny_model(family, num_experts=experts, seed=seed)


def _ids(batch=2, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, length), generator=g)


def _bound_and_recorded(family="qwen3_moe", experts=8, ids=None):
    """A model with RouterReplay bound and its own routing of ``ids``: (model, rr, ids, routed)."""
    model = _model(family, experts)
    ids = _ids() if ids is None else ids
    rr = RouterReplay(model)
    with torch.no_grad(), rr.record() as rec:
        model(input_ids=ids)
    return model, rr, ids, rec.routed_experts


def _perturbed_routing(model, ids, scale=3.0):
    """Routing recorded on a copy whose routers were perturbed: differs from the model's own."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    rr = RouterReplay(other)
    with torch.no_grad(), rr.record() as rec:
        other(input_ids=ids)
    return rec.routed_experts


class _ExpertsSpy:
    """Captures what every MoE layer's experts module receives (indices and gate weights)."""

    def __init__(self, rr):
        self.seen = {}
        self.hooks = [
            layer.experts.register_forward_pre_hook(self._make(layer.index)) for layer in rr.layers
        ]

    def _make(self, index):
        def hook(module, args):
            self.seen[index] = (args[1].clone(), args[2].detach().clone())

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()


def _router_inputs(rr):
    """Capture each router's input hidden states [N, H]."""
    seen, hooks = {}, []
    for layer in rr.layers:
        def hook(module, args, index=layer.index):
            seen[index] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        hooks.append(layer.router.register_forward_pre_hook(hook))
    return seen, hooks


def _reference_gates(family, config, router, hidden_NH, idx_NK):
    """The paper's gate formula per family, written independently of verl_r3.families."""
    h = hidden_NH.double()
    w = router.weight.detach().double()
    if family == "gpt_oss":
        logits = h @ w.T + router.bias.detach().double()
        return torch.softmax(logits.gather(1, idx_NK), dim=-1)
    if family == "deepseek_v3":
        s = torch.sigmoid(h @ w.T).gather(1, idx_NK)
        return s / (s.sum(-1, keepdim=True) + 1e-20) * config.routed_scaling_factor
    probs = torch.softmax(h @ w.T, dim=-1).gather(1, idx_NK)
    renorm = family == "mixtral" or config.norm_topk_prob
    return probs / probs.sum(-1, keepdim=True) if renorm else probs


@pytest.mark.parametrize("family,experts", CASES, ids=IDS)
def test_own_routing_replay_is_bit_exact(family, experts):
    model = _model(family, experts)
    rr = RouterReplay(model)
    ids = _ids()
    with torch.no_grad():
        native = model(input_ids=ids).logits
        with rr.record() as rec:
            model(input_ids=ids)
        routed = rec.routed_experts
        with rr.replay(routed) as handle:
            replayed = model(input_ids=ids).logits
    assert routed.shape == (2, 10, model.config.num_hidden_layers, rr.top_k)
    for layer in range(model.config.num_hidden_layers):
        if layer in rr.moe_layers:
            assert (routed[:, :, layer] >= 0).all() and (routed[:, :, layer] < experts).all()
        else:
            assert (routed[:, :, layer] == MISSING).all()
    assert torch.equal(native, replayed)
    assert torch.equal(handle.native_experts, routed)
    assert rr.stats["replayed"] == 20 * len(rr.moe_layers)
    assert rr.stats["fallback"] == 0 and rr.stats["disagree"] == 0 and rr.stats["forwards"] == 1


@pytest.mark.parametrize("family,experts", CASES, ids=IDS)
def test_foreign_routing_is_what_experts_receive_with_family_gates_and_router_grads(family, experts):
    model = _model(family, experts)
    ids = _ids()
    foreign = _perturbed_routing(model, ids)
    rr = RouterReplay(model)
    with torch.no_grad():
        native = model(input_ids=ids).logits
    spy = _ExpertsSpy(rr)
    inputs, hooks = _router_inputs(rr)
    with rr.replay(foreign) as handle:
        out = model(input_ids=ids).logits
        out.float().logsumexp(-1).mean().backward()
    spy.remove()
    for h in hooks:
        h.remove()
    assert not torch.equal(out, native)
    assert rr.stats["disagree"] > 0
    for layer in rr.layers:
        idx, weights = spy.seen[layer.index]
        expected_idx = foreign[:, :, layer.index].reshape(-1, rr.top_k).long()
        assert torch.equal(idx, expected_idx), f"layer {layer.index}"
        # The handle reports what the experts received (seen by the spy), not what was asked for.
        assert torch.equal(handle.used_experts[:, :, layer.index].reshape(-1, rr.top_k).long(), idx)
        ref = _reference_gates(family, model.config, layer.router, inputs[layer.index], expected_idx)
        torch.testing.assert_close(weights.double(), ref, rtol=1e-5, atol=1e-6)
        grad = layer.router.weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"router of layer {layer.index} got no gradient"
    # The per-layer disagreement counted during replay is the metric between the two routings.
    metric = router_disagreement(foreign, handle.native_experts)
    assert rr.stats["disagree"] == round(metric["router"] * metric["pairs"])
    for layer in rr.layers:
        assert rr.stats["disagree_per_layer"][layer.index] == pytest.approx(metric["per_layer"][layer.index])


def test_replayed_experts_that_the_trainer_would_not_pick_get_gradient():
    """The pitfall: gathering from probabilities zeroed outside the trainer's own top-k."""
    model, rr, ids, own = _bound_and_recorded(ids=_ids(1, 6))
    # Route every token of every MoE layer to experts the trainer did not choose.
    foreign = own.clone()
    for layer in rr.moe_layers:
        chosen = own[:, :, layer].long()
        all_e = torch.arange(8).expand(*chosen.shape[:2], 8)
        unused = all_e[~(all_e.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1)].view(*chosen.shape[:2], 6)
        foreign[:, :, layer] = unused[..., :2].to(own.dtype)
    with rr.replay(foreign):
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    for layer in rr.layers:
        rows = layer.router.weight.grad.abs().sum(dim=1)
        picked = foreign[:, :, layer.index].unique().long()
        assert (rows[picked] > 0).all()


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_grads_equal_plain_grads(family, reentrant):
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        model = _model(family, 8).train()
        foreign = _perturbed_routing(model, ids)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        rr = RouterReplay(model)
        with rr.replay(foreign):
            loss = F.cross_entropy(model(input_ids=ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        assert rr.stats["recomputed"] == (len(rr.moe_layers) if checkpointing else 0)
        assert rr.stats["forwards"] == 1
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("reentrant", [True, False])
def test_backward_after_the_block_with_checkpointing_raises(reentrant):
    model = _model("qwen3_moe", 8).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = _ids()
    foreign = _perturbed_routing(model, ids)
    rr = RouterReplay(model)
    with rr.replay(foreign):
        loss = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    with pytest.raises(RuntimeError, match="backward after leaving rr.replay"):
        loss.backward()


def test_backward_after_the_block_without_checkpointing_uses_replayed_routing():
    model = _model("qwen3_moe", 8).train()
    ids = _ids()
    foreign = _perturbed_routing(model, ids)
    rr = RouterReplay(model)
    with rr.replay(foreign):
        loss_inside = model(input_ids=ids).logits.float().logsumexp(-1).mean()
        loss_inside.backward()
    inside = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with rr.replay(foreign):
        loss_after = model(input_ids=ids).logits.float().logsumexp(-1).mean()
    loss_after.backward()
    for n, g in inside.items():
        assert torch.equal(g, model.get_parameter(n).grad), n


def test_missing_rows_fall_back_to_native_for_exactly_those_tokens():
    model = _model("deepseek_v3", 8)
    ids = _ids()
    rr = RouterReplay(model)
    with torch.no_grad():
        foreign = _perturbed_routing(model, ids)
        with rr.record() as rec:
            model(input_ids=ids)
        own = rec.routed_experts
        partial = foreign.clone()
        # token (0, 3) in layer 1 and all of sample 1 in layer 2: native routing there.
        partial[0, 3, 1] = MISSING
        partial[1, :, 2] = MISSING
        spy = _ExpertsSpy(rr)
        with rr.replay(partial) as handle:
            model(input_ids=ids)
        spy.remove()
    native = handle.native_experts  # what the trainer chose, given the replayed layers before
    assert rr.stats["fallback"] == 1 + 10
    assert rr.stats["replayed"] == 2 * 20 - 11
    got1 = spy.seen[1][0].view(2, 10, -1)
    assert torch.equal(got1[0, 3], own[0, 3, 1].long())  # first MoE layer: nothing replayed before it
    assert torch.equal(got1[1], foreign[1, :, 1].long())
    got2 = spy.seen[2][0].view(2, 10, -1)
    assert torch.equal(got2[1], native[1, :, 2].long())
    assert torch.equal(got2[0], foreign[0, :, 2].long())


def test_own_routing_with_missing_rows_stays_bit_exact():
    model = _model("qwen2_moe", 8)
    ids = _ids()
    rr = RouterReplay(model)
    with torch.no_grad():
        native = model(input_ids=ids).logits
        with rr.record() as rec:
            model(input_ids=ids)
        routed = rec.routed_experts.clone()
        routed[:, -1] = MISSING  # the engine convention: no row for the last token
        with rr.replay(routed):
            out = model(input_ids=ids).logits
    assert torch.equal(native, out)
    assert rr.stats["fallback"] == 2 * len(rr.moe_layers)


def test_padding_and_packed_sequences():
    model = _model("mixtral", 8)
    rr = RouterReplay(model)
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    packed = ids.reshape(1, 16)
    position_ids = torch.cat([torch.arange(8), torch.arange(8)]).unsqueeze(0)
    with torch.no_grad():
        for kwargs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": packed, "position_ids": position_ids}):
            native = model(**kwargs).logits
            with rr.record() as rec:
                model(**kwargs)
            with rr.replay(rec.routed_experts):
                assert torch.equal(model(**kwargs).logits, native)


def test_r2_record_then_replay_in_the_next_forward():
    model = _model("olmoe", 8).train()
    ids = _ids()
    rr = RouterReplay(model)
    with torch.no_grad(), rr.record() as rec:
        old = model(input_ids=ids).logits
    with torch.no_grad():
        for p in model.parameters():  # an optimizer step in between
            p.add_(torch.randn_like(p) * 1e-2)
        native_after = model(input_ids=ids).logits
    with rr.replay(rec.routed_experts) as handle:
        new = model(input_ids=ids).logits
    assert not torch.equal(new, old)
    assert rr.stats["replayed"] == 20 * 3
    # After the update the trainer's own choice moved for some tokens; replay kept the old one.
    assert rr.stats["disagree"] == int((handle.native_experts.sort(-1).values != rec.routed_experts.sort(-1).values).any(-1).sum())
    assert rr.stats["disagree"] > 0  # the update moved some choices ...
    assert not torch.equal(native_after, new)  # ... so replaying the old routing changes the output


@pytest.mark.parametrize("pending_ids", [None, 0])
def test_record_lays_out_each_forward_as_its_router_chose_read_midway_or_not(monkeypatch, pending_ids):
    """A record block keeps each layer's router ids as made and lays a forward out (one stack, the
    record dtype, -1 in the dense layer) when the handle is read, or at the forward's end once the
    block holds more than ``RECORD_PENDING_IDS`` of them (0 here: every forward). Either way, and
    read between forwards or only at the end, each forward's routing is the one its routers chose."""
    from verl_r3.core import replay as replay_module

    if pending_ids is not None:
        monkeypatch.setattr(replay_module, "RECORD_PENDING_IDS", pending_ids)
    model = _model("deepseek_v3", 8)  # layer 0 dense
    rr = RouterReplay(model)
    spy = _ExpertsSpy(rr)
    batches = [_ids(2, 10, seed=1), _ids(2, 1, seed=2), _ids(3, 4, seed=3)]
    chosen, midway = [], []
    with torch.no_grad(), rr.record() as rec:
        for i, ids in enumerate(batches):
            model(input_ids=ids)
            chosen.append({index: idx.clone() for index, (idx, _weights) in spy.seen.items()})
            if pending_ids == 0:  # laid out at each forward's end: the block holds no router ids
                assert not rec._pending
            if i == 1:
                midway = [t.clone() for t in rec.forwards]  # read between forwards
    assert len(rec.forwards) == 3 and len(midway) == 2
    for ids, forward, layers in zip(batches, rec.forwards, chosen):
        B, T = ids.shape
        assert forward.shape == (B, T, rr.num_layers, rr.top_k) and forward.dtype == torch.int16
        assert (forward[:, :, 0] == MISSING).all()
        for index, idx in layers.items():
            assert torch.equal(forward[:, :, index].reshape(-1, rr.top_k), idx.to(torch.int16))
    for before, after in zip(midway, rec.forwards):
        assert torch.equal(before, after)
    assert torch.equal(rec.routed_experts, rec.forwards[-1])


def _bad_routings(routed, rr):
    E = rr.num_experts
    cases = {}
    cases["rank"] = (routed[0], r"must be a \[batch, positions, layers, top_k\] tensor, got \(10, 3, 2\)")
    cases["layers"] = (routed[:, :, :-1], "layers")
    cases["top_k"] = (routed[..., :1], "top_k")
    r = routed.clone(); r[1, 4, 0, 0] = E; cases["out of range"] = (r, r"sample 1, row 4, layer 0: expert id >= num_experts")
    r = routed.clone(); r[0, 2, 2, 1] = -3; cases["negative"] = (r, r"sample 0, row 2, layer 2: negative id")
    r = routed.clone(); r[1, 7, 2, 1] = r[1, 7, 2, 0]; cases["duplicate"] = (r, r"sample 1, row 7, layer 2: duplicate")
    r = routed.clone(); r[0, 5, 0, 1] = MISSING; cases["partly missing"] = (r, r"sample 0, row 5, layer 0: row partly -1")
    r = routed.clone(); r[0, 1, 1] = torch.tensor([0, 1]); cases["dense layer"] = (r, r"sample 0, row 1, layer 1: expert ids in a layer without MoE")
    cases["uint16"] = (routed.to(torch.uint16), "not a signed integer dtype or uint8")
    cases["float"] = (routed.float(), "not a signed integer dtype")
    # uint8 routing marks missing rows with zeros: a -1 cast to it is id 255, out of range.
    cases["uint8 cast of -1"] = (routed.to(torch.uint8), r"sample 0, row 0, layer 1: expert id >= num_experts=8")
    cases["batch mismatch"] = (routed[:1], r"covers \[batch, positions\]=\(1, 10\) but the forward's input is \(2, 10\)")
    cases["length mismatch"] = (routed[:, :9], r"\(2, 9\) but the forward's input is \(2, 10\)")
    return cases


def test_malformed_routing_raises_before_the_forward_runs():
    model, rr, ids, own = _bound_and_recorded()  # qwen3_moe: layer 1 is dense
    calls = []
    model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    for name, (bad, message) in _bad_routings(own, rr).items():
        with pytest.raises(ValueError, match=message):
            with rr.replay(bad):
                model(input_ids=ids)
        assert not calls, f"{name}: the forward ran before the error"
        assert rr.mode.value == "off"


def test_dtype_too_small_for_the_expert_count():
    model = _model("qwen3_moe", 300)
    rr = RouterReplay(model)
    routed = torch.zeros(1, 4, 3, 2, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8 is too small for 300 experts"):
        with rr.replay(routed):
            pass


def test_unsupported_and_dense_models_are_rejected():
    import transformers

    dense = transformers.AutoModelForCausalLM.from_config(
        transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    )
    with pytest.raises(ValueError, match=r"'qwen3' is not a supported MoE family \(supported: .*qwen3_moe"):
        RouterReplay(dense)
    all_dense = tiny_model("qwen3_moe", mlp_only_layers=[0, 1, 2])
    with pytest.raises(ValueError, match="has no MoE layer"):
        RouterReplay(all_dense)
    with pytest.raises(ValueError, match="not a supported MoE family"):
        RouterReplay(torch.nn.Linear(2, 2))


def test_binding_twice_and_remove():
    model = _model("qwen3_moe", 8)
    rr = RouterReplay(model)
    with pytest.raises(ValueError, match="already has a RouterReplay"):
        RouterReplay(model)
    rr.remove()
    rr2 = RouterReplay(model)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        with rr.record():
            pass
    with rr2.record() as rec, torch.no_grad():
        model(input_ids=_ids())
    assert rec.routed_experts.shape[1] == 10


def test_replay_binds_to_its_own_model_instance():
    model = _model("qwen3_moe", 8)
    rr = RouterReplay(model)
    twin = copy.deepcopy(model)  # carries the hooks, must not be replayed through rr
    ids = _ids()
    foreign = _perturbed_routing(model, ids)
    with torch.no_grad():
        twin_native = twin(input_ids=ids).logits
        with rr.replay(foreign):
            twin_out = twin(input_ids=ids).logits
            model_out = model(input_ids=ids).logits
    assert torch.equal(twin_out, twin_native)
    assert not torch.equal(model_out, twin_native)
    assert rr.stats["forwards"] == 1


def test_uint8_routing_with_zero_rows_missing_replays_like_its_signed_form():
    model, rr, ids, own = _bound_and_recorded()
    foreign = _perturbed_routing(model, ids)
    foreign[1, 3:5] = MISSING  # rows without routing: native there
    compact = foreign.clamp(min=0).to(torch.uint8)  # missing rows (and the dense layer) become zero rows
    with torch.no_grad():
        with rr.replay(foreign) as signed:
            expected = model(input_ids=ids).logits
        signed_stats = rr.stats
        with rr.replay(compact) as unsigned:
            got = model(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert rr.stats == signed_stats and rr.stats["fallback"] == 2 * 2 and rr.stats["disagree"] > 0
    assert unsigned.native_experts.dtype == torch.uint8
    assert torch.equal(unsigned.native_experts.to(torch.int16).clamp(min=0), signed.native_experts.clamp(min=0).to(torch.int16))
    assert torch.equal(unsigned.used_experts.clamp(min=0).to(torch.int16), signed.used_experts.clamp(min=0).to(torch.int16))


def test_a_replay_block_that_ran_only_another_instance_fails_when_it_closes():
    model, rr, ids, own = _bound_and_recorded()
    other = _model("qwen3_moe", 8, seed=1)  # a second instance of the same architecture
    with pytest.raises(RuntimeError, match="no forward of the bound model ran inside the block"):
        with torch.no_grad(), rr.replay(own):
            other(input_ids=ids)
    assert rr.mode.value == "off"
    with pytest.raises(ZeroDivisionError):  # an error inside the block is the one reported
        with rr.replay(own):
            1 / 0
    with torch.no_grad(), rr.replay(own) as handle:
        model(input_ids=ids)
    assert handle.replayed_layers == rr.moe_layers == frozenset({0, 2})


def test_a_layer_that_bypasses_its_router_fails_loudly():
    model, rr, ids, own = _bound_and_recorded()
    block = model.model.layers[2].mlp
    block.forward = lambda hidden: hidden * 0  # a kernel that never calls the router
    with pytest.raises(RuntimeError, match=r"MoE layers \[2\] were not routed"):
        with torch.no_grad(), rr.replay(own):
            model(input_ids=ids)


def test_blocks_do_not_nest_and_record_needs_a_forward():
    model = _model("qwen3_moe", 8)
    rr = RouterReplay(model)
    with rr.record() as rec:
        with pytest.raises(RuntimeError, match="cannot enter replay inside a record block"):
            with rr.replay(torch.zeros(1, 1, 3, 2, dtype=torch.int16)):
                pass
    with pytest.raises(RuntimeError, match="no forward"):
        rec.routed_experts


def _in_a_fresh_interpreter(code: str) -> None:
    """Run ``code`` in a new Python process; it must end by printing ``ok``."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_core_imports_without_verl_vllm_sglang_or_transformers():
    _in_a_fresh_interpreter("""
        import sys
        for name in ('verl', 'vllm', 'sglang', 'transformers'):
            sys.modules[name] = None
        import verl_r3
        from verl_r3.core import record, replay, metrics
        from verl_r3 import RouterReplay, RoutingRecord
        assert sys.modules['transformers'] is None
        print('ok')
    """)


def test_the_package_imports_without_torch_and_registers_its_families_on_first_lookup():
    _in_a_fresh_interpreter("""
        import sys
        import verl_r3, verl_r3.keys, verl_r3.wandb_naming, verl_r3.integration.cpu_settings
        assert 'torch' not in sys.modules, 'torch imported'
        from verl_r3.core import replay
        assert 'verl_r3.families' not in sys.modules and not replay._FAMILIES
        import transformers
        cfg = transformers.Qwen3MoeConfig(num_hidden_layers=3, num_experts=16, num_experts_per_tok=4)
        assert replay.routing_dims(cfg) == (3, 4, 16), replay.routing_dims(cfg)
        assert {'qwen3_moe', 'deepseek_v3', 'gpt_oss'} <= set(replay.supported_families())
        assert verl_r3.RouterReplay is replay.RouterReplay and verl_r3.core.family_modules == []
        verl_r3.core.family_modules.append('verl_r3_no_such_adapters')
        try:
            replay.supported_families()
        except ModuleNotFoundError as exc:
            assert 'verl_r3_no_such_adapters' in str(exc)
        else:
            raise AssertionError('a missing adapter module was skipped')
        assert verl_r3.core.family_modules == ['verl_r3_no_such_adapters']
        print('ok')
    """)


def test_threads_looking_up_their_first_family_together_all_see_every_family():
    _in_a_fresh_interpreter("""
        import threading
        from verl_r3.core import replay
        barrier, seen, errors = threading.Barrier(8), [], []

        def look():
            barrier.wait()
            try:
                seen.append(tuple(replay.supported_families()))
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=look) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
        assert len(seen) == 8 and len(set(seen)) == 1 and 'qwen3_moe' in seen[0], seen
        print('ok')
    """)


def test_adding_a_family_is_one_small_adapter():
    from verl_r3.core.replay import RouterFamily, register_family, supported_families
    from verl_r3.families import transformers_version

    class MadeUp(RouterFamily):  # a made-up family built like Qwen3-MoE
        model_types = ("made_up_moe",)

        def locate(self, decoder_layer):
            block = decoder_layer.mlp
            return (block.gate, block.experts) if hasattr(block, "experts") else None

        def num_experts(self, config):
            return config.num_experts

        def gates(self, scores, idx_NK, config):
            # transformers < 5.6 hands over probabilities, later releases logits
            probs = scores if transformers_version() < (5, 6, 0) else torch.softmax(scores, dtype=torch.float, dim=-1)
            top = probs.gather(1, idx_NK)
            return (top / top.sum(-1, keepdim=True)).to(scores.dtype)

    register_family(MadeUp())
    try:
        assert "made_up_moe" in supported_families()
        model = _model("qwen3_moe", 8)
        model.config.model_type = "made_up_moe"
        rr = RouterReplay(model)
        assert isinstance(rr.family, MadeUp)
        ids = _ids()
        with torch.no_grad():
            native = model(input_ids=ids).logits
            with rr.record() as rec:
                model(input_ids=ids)
            with rr.replay(rec.routed_experts):
                assert torch.equal(model(input_ids=ids).logits, native)
    finally:
        from verl_r3.core import replay as replay_module

        replay_module._FAMILIES.pop("made_up_moe", None)


def test_a_layer_routed_twice_in_one_forward_fails_loudly():
    model, rr, ids, own = _bound_and_recorded()
    block = model.model.layers[0].mlp
    once = block.forward
    block.forward = lambda hidden: once(once(hidden))  # a block that consumes its targets twice
    with pytest.raises(RuntimeError, match="layer 0 routed twice in one forward"):
        with torch.no_grad(), rr.replay(own):
            model(input_ids=ids)
