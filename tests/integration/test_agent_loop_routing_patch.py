"""verl_r3.patches.verl_agent_loop_routing_0_9 on verl's own AgentLoopOutput and agent loop worker
class: routing of FSDP actors carried as uint8 (one byte per id), verl's int16 elsewhere. The
whole path (rollout -> TransferQueue -> FSDP engine) runs in tests/integration/test_main_ppo_cpu.py."""

from __future__ import annotations

import asyncio
import os
import sys
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from patch_state import reverted  # noqa: E402

pytest.importorskip("verl")

from verl_r3.patches import verl_agent_loop_routing_0_9 as patch  # noqa: E402


@pytest.fixture
def applied():
    with reverted(patch):
        assert patch.apply() and not patch.apply()  # idempotent
        yield patch


def _output(routed, prompt=3, response=4):
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    return AgentLoopOutput(prompt_ids=list(range(prompt)), response_ids=list(range(response)),
                           response_mask=[1] * response, routed_experts=routed, metrics=AgentLoopMetrics())


def _rows(n=6, layers=2, k=2, high=128, seed=0):
    return np.random.default_rng(seed).integers(0, high, (n, layers, k)).astype(np.int32)


def test_uint8_routing_stays_uint8_and_is_aligned_as_verl_aligns_it(applied):
    rows = _rows()
    mine = _output(torch.from_numpy(rows).to(torch.uint8)).as_dict()["routed_experts"]
    verls = _output(rows).as_dict()["routed_experts"]  # anything else: verl's int16, unchanged
    assert mine.dtype == torch.uint8 and verls.dtype == torch.int16
    assert mine.shape == verls.shape == (7, 2, 2) and torch.equal(mine.to(torch.int16), verls)
    assert (mine[6] == 0).all()  # the last token's row: zero, as verl leaves it
    output = _output(torch.from_numpy(rows).to(torch.uint8))
    output.as_dict()
    assert output.routed_experts.dtype == torch.uint8  # the output itself is left as it was


def _config(strategy):
    from omegaconf import OmegaConf

    return OmegaConf.create({"actor_rollout_ref": {"actor": {"strategy": strategy}}})


def _worker(strategy="fsdp2", *, routing=True, layers=2, top_k=2):
    """What the wrappers read of verl's agent loop worker: its config, rollout config and model config."""
    from verl_r3.tiny import tiny_config

    hf_config = tiny_config("qwen3_moe", num_hidden_layers=layers, num_experts_per_tok=top_k)
    return types.SimpleNamespace(config=_config(strategy),
                                 rollout_config=types.SimpleNamespace(enable_rollout_routing_replay=routing),
                                 model_config=types.SimpleNamespace(hf_config=hf_config))


def _run(wrapped, worker, output, **kwargs):
    asyncio.run(wrapped(worker, output, False, **kwargs))


@pytest.mark.parametrize("strategy, dtype", [("fsdp", torch.uint8), ("fsdp2", torch.uint8), ("megatron", None)])
def test_worker_compacts_routing_only_for_fsdp_actors(strategy, dtype):
    seen = []

    async def verls_postprocess(self, output, validate, **kwargs):  # stands for what verl runs next
        seen.extend(o.routed_experts for o in (output if isinstance(output, list) else [output]))

    wrapped = patch._checking(verls_postprocess, legacy=False)
    worker = _worker(strategy)
    rows = _rows(high=256)
    _run(wrapped, worker, [_output(rows)], uid="u", session_id=0)
    if dtype is None:
        assert seen[0] is rows  # megatron: verl's own path, untouched
    else:
        assert seen[0].dtype == dtype and seen[0].numpy().tolist() == rows.tolist()
    wide = _rows(high=300)
    _run(wrapped, worker, _output(wide))
    if dtype is not None:
        assert seen[1].dtype == torch.int16 and seen[1].numpy().tolist() == wide.tolist()  # over 256 experts
    vllms = wide.astype(np.uint16)  # what vLLM returns above 256 experts
    _run(wrapped, worker, _output(vllms))
    if dtype is None:
        assert seen[2] is vllms
    else:
        assert seen[2].dtype == torch.int16 and seen[2].numpy().tolist() == wide.tolist()


def test_routing_off_leaves_outputs_alone():
    seen = []

    async def verls_postprocess(self, output, validate, **kwargs):
        seen.extend(o.routed_experts for o in output)

    rows = _rows(n=20)  # would be refused with routing on: more rows than tokens
    _run(patch._checking(verls_postprocess, legacy=False), _worker("megatron", routing=False), [_output(rows), _output(None)])
    assert seen[0] is rows and seen[1] is None


def test_apply_installs_on_verls_classes_and_revert_restores_them():
    from verl.experimental.agent_loop.agent_loop import AgentLoopOutput
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopWorkerTQ as actor  # Ray's actor class

    AgentLoopWorkerTQ = next(c for c in actor.__ray_metadata__.modified_class.__mro__ if c.__name__ == "AgentLoopWorkerTQ")
    with reverted(patch):
        before = AgentLoopOutput.__dict__["as_dict"], AgentLoopWorkerTQ.__dict__["_agent_loop_postprocess"]
        patch.apply()
        after = AgentLoopOutput.__dict__["as_dict"], AgentLoopWorkerTQ.__dict__["_agent_loop_postprocess"]
        assert [a.__wrapped__ for a in after] == list(before)
        assert patch.revert() and not patch.revert()
        assert (AgentLoopOutput.__dict__["as_dict"], AgentLoopWorkerTQ.__dict__["_agent_loop_postprocess"]) == before
