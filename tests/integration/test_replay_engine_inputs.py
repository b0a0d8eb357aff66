"""Input checks of the FSDP replay engine (verl_r3.integration.fsdp_replay), without building an engine."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("verl")

from verl.workers.config.engine import EngineRouterReplayConfig  # noqa: E402

from verl_r3 import MISSING  # noqa: E402
from verl_r3.integration.fsdp_replay import micro_batch_routing, router_replay_mode  # noqa: E402


def _jagged(lengths, tail=()):
    """A jagged tensor of ``len(lengths)`` samples, ``[n, *tail]`` zeros each."""
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return torch.nested.nested_tensor_from_jagged(torch.zeros((sum(lengths), *tail), dtype=torch.long),
                                                  offsets=offsets)


@pytest.mark.parametrize("config", [
    types.SimpleNamespace(router_replay=EngineRouterReplayConfig(mode="R3")),
    types.SimpleNamespace(router_replay={"mode": "R3"}),  # what Hydra leaves for ++...router_replay.mode=R3
])
def test_mode_is_read_from_a_dataclass_or_a_plain_dict(config):
    assert router_replay_mode(config) == "R3"
    assert router_replay_mode(types.SimpleNamespace()) == "disabled"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"router_replay.mode must be one of \('disabled', 'R2', 'R3'\), got 'r3'"):
        router_replay_mode(types.SimpleNamespace(router_replay={"mode": "r3"}))


def test_routing_that_does_not_fit_the_batch_names_the_sample():
    ids = _jagged([4, 6, 3])
    routed = _jagged([4, 5, 3], tail=(2, 2)).to(torch.int16)
    with pytest.raises(ValueError, match="sample 1 has 5 routing rows for 6 tokens"):
        micro_batch_routing(routed, ids, remove_padding=True)


def test_packed_and_padded_layouts_mark_each_samples_last_row_missing():
    ids = _jagged([3, 2])
    routed = torch.nested.nested_tensor_from_jagged(torch.arange(5 * 2 * 2, dtype=torch.int16).view(5, 2, 2),
                                                    offsets=torch.tensor([0, 3, 5]))
    packed = micro_batch_routing(routed, ids, remove_padding=True, pad_size=2)
    assert packed.shape == (1, 7, 2, 2)
    missing = (packed[0] == MISSING).all(-1).all(-1).tolist()
    assert missing == [False, False, True, False, True, True, True]  # last rows, then verl's static pad
    padded = micro_batch_routing(routed, ids, remove_padding=False)
    assert padded.shape == (2, 3, 2, 2)
    assert (padded[0, :2] == routed.values()[:2]).all() and (padded[1, :1] == routed.values()[3:4]).all()
    assert (padded[0, 2] == MISSING).all() and (padded[1, 1:] == MISSING).all()


def test_layers_without_a_router_become_missing_whatever_the_engine_wrote():
    # vLLM reports every decoder layer and leaves zeros (duplicate ids) in dense ones.
    ids = _jagged([3, 2])
    values = torch.arange(5 * 3 * 2, dtype=torch.int16).view(5, 3, 2) % 8
    values[:, 1] = 0
    routed = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 5]))
    packed = micro_batch_routing(routed, ids, remove_padding=True, moe_layers=frozenset({0, 2}))
    assert (packed[0, :, 1] == MISSING).all()
    kept = [0, 1, 3]  # rows that are not a sample's last row
    assert torch.equal(packed[0, kept][:, [0, 2]], values[kept][:, [0, 2]])
