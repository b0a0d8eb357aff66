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


@pytest.mark.parametrize("rmpad", [True, False], ids=["remove-padding", "padded"])
def test_compact_routing_gives_the_same_dense_routing_as_verls_int16(rmpad):
    # verl_r3 carries routing as uint8 (one byte per id) where verl carries int16: the dense
    # routing of a micro-batch must be the same, ids up to 255 included.
    lengths = [5, 1, 4]
    values = torch.randint(0, 256, (sum(lengths), 3, 2), generator=torch.Generator().manual_seed(0))
    values[0, 0] = torch.tensor([255, 0])
    offsets = torch.tensor([0, 5, 6, 10])
    ids = _jagged(lengths)
    dense = {dtype: micro_batch_routing(torch.nested.nested_tensor_from_jagged(values.to(dtype), offsets=offsets),
                                        ids, remove_padding=rmpad, pad_size=3 if rmpad else 0,
                                        moe_layers=frozenset({0, 2}))
             for dtype in (torch.uint8, torch.int16, torch.int32)}
    assert dense[torch.uint8].dtype == dense[torch.int16].dtype == torch.int16 and dense[torch.int32].dtype == torch.int32
    assert torch.equal(dense[torch.uint8], dense[torch.int16]) and torch.equal(dense[torch.uint8].int(), dense[torch.int32])
    assert int(dense[torch.uint8].max()) == 255 and (dense[torch.uint8][..., 1, :] == MISSING).all()


def test_int8_replay_routing_of_a_128_expert_model_and_ids_that_do_not_fit():
    from verl_r3.core.record import narrow_dtype

    assert narrow_dtype(128) == torch.int8 and narrow_dtype(129) == torch.int16 and narrow_dtype(256) == torch.int16
    values = torch.tensor([0, 127, 5, 64, 1, 2], dtype=torch.uint8).view(3, 1, 2)
    offsets = torch.tensor([0, 2, 3])
    routed = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
    dense = micro_batch_routing(routed, _jagged([2, 1]), remove_padding=True, dtype=torch.int8)
    assert dense.dtype == torch.int8 and dense[0, 0].tolist() == [[0, 127]] and (dense[0, 1:] == MISSING).all()
    values[2, 0, 1] = 200  # sample 1: routing of a model with more experts
    with pytest.raises(ValueError, match="sample 1 holds expert id 200"):
        micro_batch_routing(routed, _jagged([2, 1]), remove_padding=True, dtype=torch.int8)
    # A micro-batch picked from a larger batch by sample index: only its samples are read.
    picked = micro_batch_routing(routed, _jagged([2]), remove_padding=True, dtype=torch.int8,
                                 samples=torch.tensor([0]))
    assert torch.equal(picked, dense[:, :2])


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


def test_uint8_micro_batch_keeps_one_byte_per_id_with_zero_rows_missing():
    from verl_r3.core.record import missing_rows
    from verl_r3.integration.fsdp_replay import replay_dtype

    assert replay_dtype(torch.uint8, 256, 8) == torch.uint8 and replay_dtype(torch.uint8, 128, 8) == torch.uint8
    assert replay_dtype(torch.uint8, 64, 1) == torch.int8  # top-1: a zero row is expert 0
    assert replay_dtype(torch.int16, 64, 8) == torch.int8 and replay_dtype(torch.int16, 256, 8) == torch.int16
    ids = _jagged([3, 2])
    values = torch.tensor([[[255, 3], [1, 2]], [[0, 0], [4, 5]], [[7, 9], [0, 1]], [[2, 3], [6, 8]], [[9, 9], [9, 9]]],
                          dtype=torch.uint8)  # sample 0's middle row, layer 0: verl's zero fill
    routed = torch.nested.nested_tensor_from_jagged(values, offsets=torch.tensor([0, 3, 5]))
    for rmpad in (True, False):
        dense = micro_batch_routing(routed, ids, remove_padding=rmpad, dtype=torch.uint8, moe_layers=frozenset({0, 1}))
        signed = micro_batch_routing(routed, ids, remove_padding=rmpad, moe_layers=frozenset({0, 1}))
        assert dense.dtype == torch.uint8 and signed.dtype == torch.int16
        assert torch.equal(missing_rows(dense), missing_rows(signed))  # last rows, the zero row, the padding
        kept = ~missing_rows(signed).unsqueeze(-1)
        assert torch.equal(dense.to(torch.int16)[kept.expand_as(signed)], signed[kept.expand_as(signed)])
    with pytest.raises(ValueError, match="uint8 replay routing is cut from uint8 blocks only, got torch.int16"):
        micro_batch_routing(torch.nested.nested_tensor_from_jagged(values.to(torch.int16), offsets=torch.tensor([0, 3, 5])),
                            ids, remove_padding=True, dtype=torch.uint8)
