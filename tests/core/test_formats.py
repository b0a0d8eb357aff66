"""Tests for verl_r3.core.formats (pure torch/numpy, CPU)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from verl_r3.core.formats import (
    from_nested,
    from_sglang,
    from_verl_batch,
    from_vllm,
    sglang_compact_dtype,
    sglang_ids,
    sglang_rows,
    to_nested,
    to_sglang,
    to_verl_batch,
    to_vllm,
)
from verl_r3.core.record import MISSING, RoutingRecord

# (num_experts, top_k, num_layers, missing fraction, dense layers)
CONFIGS = [
    pytest.param(8, 2, 4, 0.0, (), id="E8"),
    pytest.param(8, 2, 4, 0.2, (0,), id="E8-missing-dense"),
    pytest.param(256, 8, 5, 0.15, (0, 1), id="E256-uint8-missing"),
    pytest.param(300, 4, 3, 0.1, (2,), id="E300-uint16"),
]


def _routing(n, num_layers, top_k, num_experts, *, missing=0.0, dense=(), seed=0) -> torch.Tensor:
    """Valid dense routing [n, L, K] int32: distinct experts per row (randperm-style), some
    (row, layer) pairs and whole dense layers MISSING."""
    g = torch.Generator().manual_seed(seed)
    ids_NLK = torch.rand(n, num_layers, num_experts, generator=g).argsort(dim=-1)[..., :top_k].to(torch.int32)
    missing_NL = torch.rand(n, num_layers, generator=g) < missing
    missing_NL[:, list(dense)] = True
    return ids_NLK.masked_fill(missing_NL.unsqueeze(-1), MISSING)


def _assert_same(a: RoutingRecord, b: RoutingRecord) -> None:
    assert (a.start, a.num_experts, a.ids.dtype) == (b.start, b.num_experts, b.ids.dtype)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.missing_mask(), b.missing_mask())


# -- vLLM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts,top_k,num_layers,missing,dense", CONFIGS)
@pytest.mark.parametrize("np_dtype", [np.int16, np.int32, np.int64])
def test_vllm_round_trip(num_experts, top_k, num_layers, missing, dense, np_dtype):
    routed = _routing(11, num_layers, top_k, num_experts, missing=missing, dense=dense).numpy().astype(np_dtype)
    record = from_vllm(routed, num_experts)
    assert record.rows == 11 and record.start == 0
    assert record.ids.dtype == (torch.uint8 if num_experts <= 256 else torch.uint16)
    back = to_vllm(record)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, routed.astype(np.int32))
    # torch input and a read-only array (vLLM may hand those out) give the same record
    _assert_same(from_vllm(torch.from_numpy(routed.copy()), num_experts), record)
    frozen = routed.copy()
    frozen.flags.writeable = False
    _assert_same(from_vllm(frozen, num_experts), record)


def test_vllm_uses_all_256_ids_with_missing():
    routed = _routing(64, 2, 8, 256, missing=0.3, seed=3)
    routed[0, 0] = torch.tensor([255, 0, 1, 2, 3, 4, 5, 254])
    record = from_vllm(routed.numpy(), 256)
    assert record.ids.dtype == torch.uint8 and record.missing is not None
    np.testing.assert_array_equal(to_vllm(record), routed.numpy())


def test_vllm_unsigned_input():
    routed = _routing(5, 3, 2, 8).numpy()
    record = from_vllm(routed.astype(np.uint8), 8)
    np.testing.assert_array_equal(to_vllm(record), routed)
    record = from_vllm(torch.from_numpy(routed.astype(np.uint8)), 8)
    np.testing.assert_array_equal(to_vllm(record), routed)


@pytest.mark.parametrize("num_experts, np_dtype", [(8, np.uint8), (256, np.uint8), (300, np.uint16)])
def test_vllm_native_zero_rows_are_missing(num_experts, np_dtype):
    """vLLM 0.32's own output: every decoder layer, unsigned ids, zeros in layers without MoE."""
    routed = _routing(7, 3, 2, num_experts, seed=4)
    routed[:, 1] = MISSING  # layer 1 has no router
    routed[2, 0] = MISSING  # a row vLLM never wrote
    native = routed.clamp(min=0).numpy().astype(np_dtype)
    for given in (native, torch.from_numpy(native.copy())):
        record = from_vllm(given, num_experts)
        assert torch.equal(record.to_dense().to(torch.int32), routed.to(torch.int32))
        assert (np.asarray(given)[:, 1] == 0).all()  # the caller's array is left as it was
    top1 = np.zeros((3, 2, 1), dtype=np.uint8)  # K == 1: zero is expert 0
    assert (from_vllm(top1, 8).to_dense() == 0).all()
    signed = routed.clamp(min=0).numpy().astype(np.int32)  # signed input keeps -1 as its only missing mark
    with pytest.raises(ValueError, match="duplicate expert ids"):
        from_vllm(signed, num_experts)


def test_vllm_layer_map():
    num_layers, moe = 6, [1, 3, 4, 5]
    routed = _routing(9, len(moe), 4, 64, missing=0.1, seed=1)
    record = from_vllm(routed.numpy(), 64, layer_map=moe, num_layers=num_layers)
    dense_NLK = record.to_dense()
    assert dense_NLK.shape == (9, num_layers, 4)
    assert bool((dense_NLK[:, [0, 2]] == MISSING).all())
    assert torch.equal(dense_NLK[:, moe].to(torch.int32), routed)
    assert to_vllm(record).shape == (9, num_layers, 4)


def test_vllm_errors():
    routed = _routing(4, 2, 2, 8).numpy()
    with pytest.raises(ValueError, match="needs num_layers"):
        from_vllm(routed, 8, layer_map=[0, 1])
    with pytest.raises(ValueError, match="sample 7: layer_map has 3 entries"):
        from_vllm(routed, 8, layer_map=[0, 1, 2], num_layers=4, sample=7)
    with pytest.raises(ValueError, match="distinct layers"):
        from_vllm(routed, 8, layer_map=[1, 1], num_layers=4)
    with pytest.raises(ValueError, match="distinct layers"):
        from_vllm(routed, 8, layer_map=[0, 4], num_layers=4)
    with pytest.raises(ValueError, match="pass layer_map"):
        from_vllm(routed, 8, num_layers=4)
    with pytest.raises(ValueError, match="sample 2: .*rows, layers, top_k"):
        from_vllm(routed[0], 8, sample=2)
    with pytest.raises(ValueError, match="integers"):
        from_vllm(routed.astype(np.float32), 8)
    bad = routed.copy()
    bad[1, 0, 0] = 8
    with pytest.raises(ValueError, match=r"sample 5, row 1, layer 0: expert id >= num_experts=8"):
        from_vllm(bad, 8, sample=5)
    with pytest.raises(ValueError, match="no row offset"):
        to_vllm(RoutingRecord.from_dense(torch.from_numpy(routed), 8, start=3))


# -- SGLang ---------------------------------------------------------------------------------


def _sglang_b64(routed_NLK: torch.Tensor) -> str:
    """What SGLang puts in meta_info["routed_experts"]: base64 of little-endian int32."""
    return base64.b64encode(routed_NLK.numpy().astype("<i4").tobytes()).decode()


@pytest.mark.parametrize("num_experts,top_k,num_layers,missing,dense", CONFIGS)
@pytest.mark.parametrize("start", [0, 7])
def test_sglang_round_trip(num_experts, top_k, num_layers, missing, dense, start):
    routed = _routing(13, num_layers, top_k, num_experts, missing=missing, dense=dense, seed=2)
    b64 = _sglang_b64(routed)
    kwargs = dict(num_layers=num_layers, top_k=top_k, num_experts=num_experts, start=start)
    record = from_sglang(b64, **kwargs)
    assert (record.start, record.rows) == (start, 13)
    assert torch.equal(record.to_dense(dtype=torch.int32), routed)
    _assert_same(from_sglang(b64.encode(), **kwargs), record)
    assert to_sglang(record) == (b64, start)


def test_sglang_zero_rows_of_layers_without_moe_are_missing():
    """SGLang's capture buffer starts at zero and layers without MoE never write it."""
    routed = _routing(9, 3, 2, 16, seed=5)
    routed[:, 0] = MISSING  # layer 0 has no router
    native = routed.clamp(min=0)
    kwargs = dict(num_layers=3, top_k=2, num_experts=16)
    assert torch.equal(from_sglang(_sglang_b64(native), **kwargs).to_dense().to(torch.int32), routed)
    top1 = torch.zeros((4, 3, 1), dtype=torch.int32)  # K == 1: zero is expert 0
    assert (from_sglang(_sglang_b64(top1), num_layers=3, top_k=1, num_experts=16).to_dense() == 0).all()


def test_sglang_stitch_two_turns_equals_whole_sequence():
    num_layers, top_k, num_experts = 4, 8, 256
    whole = _routing(30, num_layers, top_k, num_experts, missing=0.1, dense=(0,), seed=4)  # 31 tokens
    kwargs = dict(num_layers=num_layers, top_k=top_k, num_experts=num_experts)
    first = from_sglang(_sglang_b64(whole[:18]), **kwargs)
    second = from_sglang(_sglang_b64(whole[18:]), start=first.end, **kwargs)
    stitched = first.stitch(second)
    _assert_same(stitched, from_sglang(_sglang_b64(whole), **kwargs))
    assert torch.equal(stitched.to_dense(length=31)[:30].to(torch.int32), whole)


def test_sglang_errors():
    routed = _routing(3, 2, 4, 16)
    raw = routed.numpy().astype("<i4").tobytes()
    kwargs = dict(num_layers=2, top_k=4, num_experts=16)
    with pytest.raises(ValueError, match=r"sample 3: .*has 92 bytes, not a multiple of 32"):
        from_sglang(base64.b64encode(raw[:-4]), sample=3, **kwargs)
    with pytest.raises(ValueError, match="sample 1: SGLang routed_experts is not valid base64"):
        from_sglang("not base64!!", sample=1, **kwargs)
    with pytest.raises(ValueError, match="not valid base64"):
        from_sglang("é", **kwargs)
    with pytest.raises(ValueError, match="sample 4, row 0, layer 0: expert id >= num_experts=2"):
        from_sglang(base64.b64encode(raw), num_layers=2, top_k=4, num_experts=2, sample=4)


@pytest.mark.parametrize("dtype,width", [("<u1", 1), ("<i2", 2), ("<i4", 4)])
def test_sglang_width_follows_from_the_rows(dtype, width):
    """SGLang's own int32, and the compact forms of sglang_compact_routing_0_5, told apart by the rows."""
    routed = _routing(5, 3, 2, 200, missing=0.2, dense=(1,), seed=6)
    native = routed.clamp(min=0)  # SGLang's zero rows
    raw = native.numpy().astype(dtype).tobytes()
    assert len(raw) == 5 * 3 * 2 * width
    ids = sglang_ids(base64.b64encode(raw), num_layers=3, top_k=2, rows=5)
    assert ids.dtype == {1: torch.uint8, 2: torch.int16, 4: torch.int32}[width]
    assert torch.equal(ids.to(torch.int32), native)
    record = from_sglang(base64.b64encode(raw), num_layers=3, top_k=2, num_experts=200, rows=5, start=2)
    assert (record.start, record.rows) == (2, 5)
    assert torch.equal(record.to_dense(dtype=torch.int32), routed)


def test_sglang_rows_and_widths_that_do_not_fit():
    assert sglang_rows({"prompt_tokens": 7, "completion_tokens": 4}) == 10
    assert sglang_rows({"prompt_tokens": 7, "completion_tokens": 4}, 6) == 4
    assert sglang_rows({"prompt_tokens": 7, "completion_tokens": 4}, 50) == 0  # SGLang caps the start
    assert sglang_rows({"prompt_tokens": 1, "completion_tokens": 0}) == 0
    with pytest.raises(ValueError, match="r1: SGLang meta_info has no usable prompt_tokens"):
        sglang_rows({"prompt_tokens": 7}, who="r1: ")
    with pytest.raises(ValueError, match="routed_experts_start_len must be non-negative"):
        sglang_rows({"prompt_tokens": 7, "completion_tokens": 4}, -1)
    raw = bytes(3 * 4 * 2 * 3)  # 3 bytes per id for 3 rows: no width
    with pytest.raises(ValueError, match=r"sample 5: .*72 bytes for 3 rows x num_layers=4 x top_k=2 ids: not 1, 2 "):
        from_sglang(base64.b64encode(raw), num_layers=4, top_k=2, num_experts=8, rows=3, sample=5)
    with pytest.raises(ValueError, match="is empty, but the output has 2 routed rows"):
        sglang_ids("", num_layers=4, top_k=2, rows=2)
    assert sglang_ids("", num_layers=4, top_k=2, rows=0).shape == (0, 4, 2)
    # Without rows, SGLang's own int32: a one-byte payload of 8 rows reads as 2 rows of other ids.
    one_byte = base64.b64encode(bytes(range(64)))
    assert sglang_ids(one_byte, num_layers=4, top_k=2).shape == (2, 4, 2)
    assert sglang_ids(one_byte, num_layers=4, top_k=2, rows=8).flatten().tolist() == list(range(64))


def test_sglang_compact_dtype():
    assert [sglang_compact_dtype(e) for e in (1, 128, 255, 256, 384, 32767, 32768)] == [
        torch.uint8, torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int16, None]
    with pytest.raises(ValueError, match="positive"):
        sglang_compact_dtype(0)


# -- verl batch layout ----------------------------------------------------------------------


def _verl_batch(samples, prompt_length, response_length, num_layers, top_k):
    """Reproduce verl's agent loop (_agent_loop_postprocess + concat): prompt left-padded to
    prompt_length, response right-padded to response_length, the engine's rows written from
    the first valid position into an int16 zero tensor."""
    routed, masks = [], []
    for prompt_len, response_len, experts in samples:
        prompt_mask = torch.zeros(1, prompt_length, dtype=torch.long)
        prompt_mask[:, prompt_length - prompt_len :] = 1
        response_mask = torch.zeros(1, response_length, dtype=torch.long)
        response_mask[:, :response_len] = 1
        attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
        total_length = prompt_length + response_length
        length = experts.shape[0]
        experts_tensor = torch.from_numpy(experts.numpy()).to(torch.int16)
        sample_routed = torch.zeros(1, total_length, num_layers, top_k, dtype=experts_tensor.dtype)
        start_pos = prompt_length - prompt_len
        end_pos = min(start_pos + length, total_length)
        sample_routed[:, start_pos:end_pos] = experts_tensor.unsqueeze(0)
        routed.append(sample_routed)
        masks.append(attention_mask)
    return torch.cat(routed, dim=0), torch.cat(masks, dim=0)


def _samples(num_layers, top_k, num_experts, missing, dense, prompt_length=6, response_length=7):
    lengths = [(3, 5), (prompt_length, 2), (1, response_length), (prompt_length, response_length)]
    return [
        (p, r, _routing(p + r - 1, num_layers, top_k, num_experts, missing=missing, dense=dense, seed=10 + i))
        for i, (p, r) in enumerate(lengths)
    ]


@pytest.mark.parametrize("num_experts,top_k,num_layers,missing,dense", CONFIGS)
def test_verl_batch_round_trip(num_experts, top_k, num_layers, missing, dense):
    samples = _samples(num_layers, top_k, num_experts, missing, dense)
    routed_BSLK, mask_BS = _verl_batch(samples, 6, 7, num_layers, top_k)
    records = from_verl_batch(routed_BSLK, mask_BS, num_experts)
    assert len(records) == len(samples)
    for record, (p, r, experts) in zip(records, samples):
        n = p + r
        assert (record.start, record.rows) == (0, n - 1)  # the last token's zero row is not read
        assert torch.equal(record.to_dense(dtype=torch.int32), experts)
        assert bool((record.to_dense(length=n)[-1] == MISSING).all())
    # pad=0 is verl's own tensor bit for bit
    again = to_verl_batch(records, mask_BS, pad=0)
    assert again.dtype == torch.int16 and torch.equal(again, routed_BSLK)
    # default pad: every position without a row is MISSING, rows unchanged
    padded = to_verl_batch(records, mask_BS)
    has_row_BS = mask_BS.bool() & (mask_BS.cumsum(dim=1) < mask_BS.sum(dim=1, keepdim=True))
    assert torch.equal(padded[has_row_BS], routed_BSLK[has_row_BS])
    assert bool((padded[~has_row_BS] == MISSING).all())
    assert to_verl_batch(records, mask_BS, dtype=torch.int32).dtype == torch.int32


def test_verl_batch_zero_row_never_read_as_expert_zero():
    # K=1 is the case where an all-zero row would pass validation as "expert 0"
    samples = [(2, 3, _routing(4, 2, 1, 4, seed=5) + 1)]  # ids 1..4 -> never 0 for E=5
    routed_BSLK, mask_BS = _verl_batch(samples, 4, 4, 2, 1)
    (record,) = from_verl_batch(routed_BSLK, mask_BS, 5)
    assert record.rows == 4
    assert not bool((record.to_dense() == 0).any())


def test_verl_batch_rows_override():
    # multi-turn: the engine stopped recording before the last tool tokens (rows stay zero)
    num_layers, top_k, num_experts = 3, 2, 8
    experts = _routing(5, num_layers, top_k, num_experts, seed=6)
    routed_BSLK, mask_BS = _verl_batch([(3, 6, experts)], 4, 6, num_layers, top_k)
    # verl's zero rows are rows the engine did not return: missing, not expert 0 twice
    (whole,) = from_verl_batch(routed_BSLK, mask_BS, num_experts)
    assert whole.rows == 8 and whole.missing_mask()[5:].all() and not whole.missing_mask()[:5].any()
    assert torch.equal(whole.to_dense(dtype=torch.int32)[:5], experts)
    duplicated = routed_BSLK.clone()
    duplicated[0, 1 + 2, 1] = 4  # a real row with one id twice (the first valid position is 1)
    with pytest.raises(ValueError, match="sample 0, row 2, layer 1: duplicate expert ids"):
        from_verl_batch(duplicated, mask_BS, num_experts)
    (record,) = from_verl_batch(routed_BSLK, mask_BS, num_experts, rows=[5])
    assert torch.equal(record.to_dense(dtype=torch.int32), experts)
    with pytest.raises(ValueError, match=r"sample 0: rows=10 outside \[0, 9\]"):
        from_verl_batch(routed_BSLK, mask_BS, num_experts, rows=[10])
    # such a record does not fit its 9 tokens under the contract (must end at row 8 or 9)
    with pytest.raises(ValueError, match=r"sample 0: routing covers positions \[0, 5\) but the sequence has 9"):
        to_verl_batch([record], mask_BS)


def test_verl_batch_errors():
    num_layers, top_k, num_experts = 2, 2, 8
    samples = _samples(num_layers, top_k, num_experts, 0.0, ())
    routed_BSLK, mask_BS = _verl_batch(samples, 6, 7, num_layers, top_k)
    records = from_verl_batch(routed_BSLK, mask_BS, num_experts)

    holed = mask_BS.clone()
    holed[2, 8] = 0
    with pytest.raises(ValueError, match="sample 2: attention_mask valid positions are not one contiguous run"):
        from_verl_batch(routed_BSLK, holed, num_experts)
    with pytest.raises(ValueError, match="sample 2: attention_mask"):
        to_verl_batch(records, holed)

    bad = routed_BSLK.clone()
    bad[1, 3, 1, 0] = num_experts
    with pytest.raises(ValueError, match=r"sample 1, row 3, layer 1: expert id >= num_experts=8"):
        from_verl_batch(bad, mask_BS, num_experts)
    bad = routed_BSLK.clone()
    bad[3, 2, 0, 1] = -1  # partly missing
    with pytest.raises(ValueError, match=r"sample 3, row 2, layer 0: row partly -1"):
        from_verl_batch(bad, mask_BS, num_experts)

    too_long = records[:]
    too_long[2] = RoutingRecord.from_dense(_routing(9, num_layers, top_k, num_experts), num_experts)
    with pytest.raises(ValueError, match=r"sample 2: routing covers positions \[0, 9\) but the sequence has 8 tokens"):
        to_verl_batch(too_long, mask_BS)
    shifted = records[:]
    shifted[0] = RoutingRecord.from_dense(records[0].to_dense(), num_experts, start=2)
    with pytest.raises(ValueError, match="sample 0: routing covers positions"):
        to_verl_batch(shifted, mask_BS)

    other_k = records[:]
    other_k[3] = RoutingRecord.from_dense(_routing(12, num_layers, 3, num_experts), num_experts)
    with pytest.raises(ValueError, match=r"sample 3: \(layers, top_k, experts\)=\(2, 3, 8\) differs"):
        to_verl_batch(other_k, mask_BS)
    other_l = records[:]
    other_l[1] = RoutingRecord.from_dense(_routing(7, 3, top_k, num_experts), num_experts)
    with pytest.raises(ValueError, match=r"sample 1: \(layers, top_k, experts\)=\(3, 2, 8\) differs"):
        to_nested(other_l, [8, 8, 8, 13])
    with pytest.raises(ValueError, match="3 records for an attention_mask of 4"):
        to_verl_batch(records[:3], mask_BS)
    with pytest.raises(ValueError, match="matching attention_mask"):
        from_verl_batch(routed_BSLK[:, 1:], mask_BS, num_experts)


# -- verl nested (jagged) form --------------------------------------------------------------


def _verl_nested(routed_BSLK, mask_BS):
    """verl's own left_right_2_no_padding on a minimal TensorDict."""
    tensordict = pytest.importorskip("tensordict")
    padding = pytest.importorskip("verl.workers.utils.padding")
    batch = routed_BSLK.shape[0]
    data = tensordict.TensorDict(
        {
            "input_ids": torch.arange(mask_BS.numel()).view_as(mask_BS),
            "attention_mask": mask_BS,
            "response_mask": mask_BS[:, 6:],
            "position_ids": (mask_BS.cumsum(dim=1) - 1).clamp(min=0),
            "routed_experts": routed_BSLK,
        },
        batch_size=[batch],
    )
    return padding.left_right_2_no_padding(data)["routed_experts"]


@pytest.mark.parametrize("num_experts,top_k,num_layers,missing,dense", CONFIGS)
def test_nested_matches_verl_batch(num_experts, top_k, num_layers, missing, dense):
    samples = _samples(num_layers, top_k, num_experts, missing, dense)
    routed_BSLK, mask_BS = _verl_batch(samples, 6, 7, num_layers, top_k)
    nested = _verl_nested(routed_BSLK, mask_BS)
    assert nested.is_nested
    batch_records = from_verl_batch(routed_BSLK, mask_BS, num_experts)
    nested_records = from_nested(nested, num_experts)
    for a, b in zip(batch_records, nested_records, strict=True):
        _assert_same(a, b)
    lengths = mask_BS.sum(dim=1).tolist()
    again = to_nested(nested_records, lengths, pad=0)
    assert torch.equal(again.offsets().to(torch.int64), nested.offsets().to(torch.int64))
    assert again.values().dtype == torch.int16 and torch.equal(again.values(), nested.values())
    padded = to_nested(nested_records, lengths)
    for component, record, n in zip(padded.unbind(), nested_records, lengths):
        assert torch.equal(component, record.to_dense(length=n, dtype=torch.int16))


def test_nested_rows_and_errors():
    num_layers, top_k, num_experts = 2, 3, 16
    routed = [_routing(n, num_layers, top_k, num_experts, seed=n) for n in (4, 6)]
    values = torch.cat([torch.cat([r, torch.zeros(1, num_layers, top_k, dtype=r.dtype)]) for r in routed])
    nested = torch.nested.nested_tensor_from_jagged(values.to(torch.int16), offsets=torch.tensor([0, 5, 12]))
    records = from_nested(nested, num_experts)
    assert [r.rows for r in records] == [4, 6]
    short = from_nested(nested, num_experts, rows=[2, 0])
    assert [r.rows for r in short] == [2, 0]
    assert torch.equal(short[0].to_dense(dtype=torch.int32), routed[0][:2])
    with pytest.raises(ValueError, match=r"sample 1: rows=8 outside \[0, 7\]"):
        from_nested(nested, num_experts, rows=[4, 8])
    zero_row = from_nested(nested, num_experts, rows=[4, 7])[1]  # verl's zero row: missing
    assert zero_row.rows == 7 and zero_row.missing_mask()[6].all() and not zero_row.missing_mask()[:6].any()
    duplicated = values.clone()
    duplicated[5 + 2, 0] = torch.tensor([3, 3, 5])
    with pytest.raises(ValueError, match=r"sample 1, row 2, layer 0: duplicate expert ids"):
        from_nested(torch.nested.nested_tensor_from_jagged(duplicated.to(torch.int16), offsets=torch.tensor([0, 5, 12])),
                    num_experts)
    with pytest.raises(ValueError, match="nested"):
        from_nested(values, num_experts)
    with pytest.raises(ValueError, match=r"sample 0: routing covers positions \[0, 4\) but the sequence has 6"):
        to_nested(records, [6, 7])
    with pytest.raises(ValueError, match="2 records but 1 lengths"):
        to_nested(records, [5])
    with pytest.raises(ValueError, match="no records"):
        to_nested([], [])
