"""The ``hf`` rollout engine (verl_r3.integration.hf_rollout) in-process: the generator, its
batching front with per-request abort, and the server's abort_request.

Its Ray server and replica run inside verl's trainer in test_main_ppo_cpu.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import engine_harness as H  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from verl_r3 import RouterReplay  # noqa: E402
from verl_r3.integration.hf_rollout import HFBatcher, HFGenerator, Request, fuse_expert_weights  # noqa: E402


@pytest.fixture(scope="module")
def model_path():
    path, _, tok = H.model_dir()
    return path, tok


def _generator(model_path, dtype=torch.bfloat16, **kw):
    path, tok = model_path
    return HFGenerator(path, dtype=dtype, capture_routing=True, eos_token_ids=[tok.eos_token_id],
                       pad_token_id=tok.pad_token_id, **kw)


def _requests(temperature=1.0, seeds=(11, 12, 13)):
    shapes = [(3, 5), (7, 9), (4, 2)]
    return [Request(prompt_ids=list(range(5 + i, 5 + i + n)), max_tokens=m, temperature=temperature, seed=s)
            for i, ((n, m), s) in enumerate(zip(shapes, seeds))]


def test_batched_generation_returns_the_routing_and_log_probs_of_a_plain_forward(model_path):
    # In float32. A cached, left-padded batched decode and one plain forward round differently; in
    # bf16 how far depends on the CPU's kernels (on a machine with AVX only: log-probs 2e-3 apart,
    # and a token whose two experts' scores tie in bf16 listed in the other order), which is the
    # rollout-trainer mismatch R3 exists for, not a fault of the generator.
    gen = _generator(model_path, dtype=torch.float32)
    reqs = _requests()
    results = gen.generate(reqs)
    path, _ = model_path
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                     experts_implementation="eager").eval()
    rr = RouterReplay(ref_model)
    for req, res in zip(reqs, results):
        assert 1 <= len(res.token_ids) <= req.max_tokens and res.stop_reason == "completed"
        seq = torch.tensor([req.prompt_ids + res.token_ids])
        with torch.no_grad(), rr.record() as rec:
            logits = ref_model(input_ids=seq[:, :-1]).logits[0].float()
        # One row per token fed to the model: prompt + response - 1, in vLLM's layout: one byte per id,
        # zeros in the layer without MoE (the record has -1 there).
        assert res.routed_experts.shape == (seq.shape[1] - 1, rr.num_layers, rr.top_k)
        assert res.routed_experts.dtype == np.uint8 and rr.moe_layers == {0, 2}
        assert torch.equal(torch.from_numpy(res.routed_experts).to(rec.routed_experts.dtype),
                           rec.routed_experts[0].clamp(min=0))
        assert (rec.routed_experts[0, :, 1] == -1).all() and (res.routed_experts[:, 1] == 0).all()
        expected = torch.log_softmax(logits, -1)[len(req.prompt_ids) - 1:].gather(
            -1, torch.tensor(res.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(res.log_probs), expected, rtol=0, atol=1e-5)


def test_routing_of_a_model_with_more_than_256_experts_is_uint16_as_vllms():
    path, _, tok = H.model_dir(num_experts=300)
    gen = HFGenerator(path, dtype=torch.float32, capture_routing=True, eos_token_ids=[tok.eos_token_id],
                      pad_token_id=tok.pad_token_id)
    reqs = _requests()
    results = gen.generate(reqs)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa",
                                                     experts_implementation="eager").eval()
    rr = RouterReplay(ref_model)
    top = 0
    for req, res in zip(reqs, results):
        seq = torch.tensor([req.prompt_ids + res.token_ids])
        with torch.no_grad(), rr.record() as rec:
            ref_model(input_ids=seq[:, :-1])
        assert res.routed_experts.dtype == np.uint16
        assert torch.equal(torch.from_numpy(res.routed_experts.astype(np.int32)),
                           rec.routed_experts[0].clamp(min=0).int())
        top = max(top, int(res.routed_experts.max()))
    assert top > 255  # ids past one byte did come back


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


# -- per-request abort ----------------------------------------------------------------------------
def _abort_requests(seeds=(31, 32, 33)):
    return [Request(prompt_ids=list(range(9 + 3 * i, 9 + 3 * i + 4 + 5 * i)), max_tokens=20, ignore_eos=True, seed=s,
                    request_id=f"req-{i}") for i, s in enumerate(seeds)]


def _assert_prefix_of(part, whole, rows=None):
    """``part`` (aborted) is what ``whole`` (the same request run to its end) had after len(part) tokens."""
    n = len(part.token_ids)
    assert part.stop_reason == "aborted" and 1 <= n < len(whole.token_ids)
    assert part.token_ids == whole.token_ids[:n]
    torch.testing.assert_close(torch.tensor(part.log_probs), torch.tensor(whole.log_probs[:n]), rtol=0, atol=1e-5)
    rows = rows if rows is not None else part.routed_experts.shape[0]
    assert part.routed_experts.shape[0] == rows  # exactly the tokens fed: prompt + tokens - 1
    assert (part.routed_experts == whole.routed_experts[:rows]).all()


def test_a_stopped_request_ends_at_the_next_step_and_its_batch_goes_on(model_path):
    gen = _generator(model_path)
    full = gen.generate(_abort_requests())
    reqs = _abort_requests()
    reqs[1].stop.set()  # before the batch starts: it ends after the token sampled from the prefill
    results = gen.generate(reqs)
    _assert_prefix_of(results[1], full[1], rows=len(reqs[1].prompt_ids))
    assert len(results[1].token_ids) == 1
    for i in (0, 2):  # the rest of the batch is not disturbed: same tokens, log-probs and routing
        assert results[i].stop_reason == "completed" and results[i].token_ids == full[i].token_ids
        assert (results[i].routed_experts == full[i].routed_experts).all()


def test_a_request_stopped_mid_way_keeps_what_it_generated(model_path):
    gen = _generator(model_path)
    full = gen.generate(_abort_requests())
    reqs = _abort_requests()

    def stop_after_three():  # another thread, as HFBatcher.abort runs on the event loop's
        deadline = time.monotonic() + 120
        while reqs[2].generated < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        reqs[2].stop.set()

    watcher = threading.Thread(target=stop_after_three)
    watcher.start()
    results = gen.generate(reqs)
    watcher.join()
    n = len(results[2].token_ids)
    assert n >= 3
    _assert_prefix_of(results[2], full[2], rows=len(reqs[2].prompt_ids) + n - 1)
    assert [r.token_ids for r in results[:2]] == [r.token_ids for r in full[:2]]


def test_batcher_aborts_queued_and_running_requests_by_id(model_path):
    gen = _generator(model_path)
    full = gen.generate(_abort_requests()[:2])  # the batch the batcher runs once request 2 is gone

    async def scenario():
        batcher = HFBatcher(gen, max_batch=2, batch_wait_s=0.05)
        reqs = _abort_requests()
        tasks = [asyncio.ensure_future(batcher.generate(r)) for r in reqs]
        await asyncio.sleep(0)  # queued, not started
        assert batcher.progress("req-2") == 0 and batcher.progress("nobody") is None
        assert batcher.abort("req-2") and not batcher.abort("nobody")
        queued = await tasks[2]  # ends at once: no tokens, no routing
        while (batcher.progress("req-1") or 0) < 2:
            await asyncio.sleep(0.001)
        assert batcher.abort("req-1")
        return queued, await tasks[0], await tasks[1], batcher.batches

    queued, first, running, batches = asyncio.run(scenario())
    assert (queued.token_ids, queued.routed_experts, queued.stop_reason) == ([], None, "aborted")
    assert batches == 1  # the aborted request never reached the generator
    assert first.stop_reason == "completed" and first.token_ids == full[0].token_ids
    assert len(running.token_ids) >= 2
    _assert_prefix_of(running, full[1], rows=len(_abort_requests()[1].prompt_ids) + len(running.token_ids) - 1)


@pytest.fixture(scope="module")
def server(model_path):
    """``HFRolloutServer`` built from verl's composed trainer config, without Ray."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig

    import verl
    from verl_r3.integration.hf_rollout import HFRolloutServer

    path, _ = model_path
    overrides = [f"actor_rollout_ref.model.path={path}", "actor_rollout_ref.rollout.name=hf",
                 "actor_rollout_ref.rollout.enable_rollout_routing_replay=True", "actor_rollout_ref.rollout.dtype=fp32",
                 "actor_rollout_ref.rollout.prompt_length=32", "actor_rollout_ref.rollout.response_length=32"]
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer/config"),
                               version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model, dataclass_type=HFModelConfig)
    return HFRolloutServer(config.actor_rollout_ref.rollout, model_config, batch_wait_s=0.05)


PARAMS = {"temperature": 1.0, "max_tokens": 24, "ignore_eos": True}


async def _until_generated(server, request_id, n):
    while (server.batcher.progress(request_id) or 0) < n:
        await asyncio.sleep(0.001)


def test_server_abort_request_answers_like_verls_vllm_server(server):
    async def scenario():
        kept = asyncio.ensure_future(server.generate([5, 6, 7, 8], PARAMS, request_id="kept"))
        cut = asyncio.ensure_future(server.generate([9, 10, 11], PARAMS, request_id="cut"))
        await _until_generated(server, "cut", 2)
        answer = await server.abort_request("cut")
        return answer, await server.abort_request("gone"), await kept, await cut

    answer, missing, kept, cut = asyncio.run(scenario())
    assert answer == {"aborted": True, "request_id": "cut"}
    assert missing["aborted"] is False and missing["request_id"] == "gone" and "gone" in missing["error"]
    assert kept.stop_reason == "completed" and len(kept.token_ids) == 24
    assert cut.stop_reason == "aborted" and 2 <= len(cut.token_ids) < 24
    assert cut.routed_experts.shape[0] == 3 + len(cut.token_ids) - 1 and len(cut.log_probs) == len(cut.token_ids)


def test_server_abort_all_stops_the_batch_ends_the_queue_and_parks_new_requests(server):
    async def scenario():
        server.batcher.max_batch = 1  # the second request waits in the queue
        try:
            running = asyncio.ensure_future(server.generate([5, 6, 7], PARAMS, request_id="a"))
            queued = asyncio.ensure_future(server.generate([8, 9], PARAMS, request_id="b"))
            await _until_generated(server, "a", 1)
            answer = await server.abort_all_requests()
            parked = asyncio.ensure_future(server.generate([10, 11], PARAMS, request_id="c"))
            await asyncio.sleep(0.2)
            waiting = not parked.done()
            await server.resume_generation()
            return answer, await running, await queued, waiting, await parked
        finally:
            server.batcher.max_batch = 256

    answer, running, queued, waiting, parked = asyncio.run(scenario())
    assert answer == {"aborted_count": 1, "request_ids": []}
    assert running.stop_reason == "aborted" and 1 <= len(running.token_ids) < 24
    assert running.routed_experts.shape[0] == 3 + len(running.token_ids) - 1
    assert (queued.stop_reason, queued.token_ids) == ("aborted", [])
    assert waiting and parked.stop_reason == "completed" and len(parked.token_ids) == 24
