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


@pytest.mark.parametrize("strategy, dtype", [("fsdp", torch.uint8), ("fsdp2", torch.uint8), ("megatron", None)])
def test_worker_compacts_routing_only_for_fsdp_actors(strategy, dtype):
    seen = []

    async def verls_postprocess(self, output, validate, **kwargs):  # stands for what verl runs next
        seen.extend(o.routed_experts for o in (output if isinstance(output, list) else [output]))

    wrapped = patch._compacting(verls_postprocess)
    worker = types.SimpleNamespace(config=_config(strategy))
    rows = _rows(high=256)
    asyncio.run(wrapped(worker, [_output(rows), _output(None)], False, uid="u", session_id=0))
    if dtype is None:
        assert seen[0] is rows  # megatron: verl's own path, untouched
    else:
        assert seen[0].dtype == dtype and seen[0].numpy().tolist() == rows.tolist()
    assert seen[1] is None
    wide = _rows(high=300)
    asyncio.run(wrapped(worker, _output(wide), False))
    if dtype is not None:
        assert seen[2].dtype == torch.int16 and seen[2].numpy().tolist() == wide.tolist()  # over 256 experts


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
