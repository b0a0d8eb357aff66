"""The routing record: compact storage, wire encoding, alignment, stitching, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verl_r3.core.record import MISSING, RoutingRecord, dense_dtype, storage_dtype, validate_routing


def _routing(rows, layers, top_k, experts, seed=0, missing=(), dense_layers=()):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, layers, experts, generator=g)
    routed = scores.topk(top_k, dim=-1).indices.to(dense_dtype(experts))
    for row, layer in missing:
        routed[row, layer] = MISSING
    for layer in dense_layers:
        routed[:, layer] = MISSING
    return routed


@pytest.mark.parametrize("experts,dtype", [(8, torch.uint8), (256, torch.uint8), (257, torch.uint16), (300, torch.uint16)])
def test_storage_dtype(experts, dtype):
    assert storage_dtype(experts) == dtype


@pytest.mark.parametrize("bad", [0, 65536])
def test_storage_dtype_rejects_impossible_counts(bad):
    with pytest.raises(ValueError, match="num_experts must be in"):
        storage_dtype(bad)


@pytest.mark.parametrize("experts", [8, 256, 300])
@pytest.mark.parametrize("with_missing", [False, True])
def test_dense_compact_wire_round_trip_is_exact(experts, with_missing):
    missing = [(0, 1), (5, 2)] if with_missing else []
    routed = _routing(7, 4, 3, experts, missing=missing, dense_layers=[0])
    record = RoutingRecord.from_dense(routed, experts, start=3)
    assert record.ids.dtype == storage_dtype(experts)
    assert (record.rows, record.num_layers, record.top_k, record.start, record.end) == (7, 4, 3, 3, 10)
    assert torch.equal(record.to_dense(), routed)
    wire = record.to_wire()
    assert set(wire) == {"data", "shape", "dtype", "start", "num_experts", "missing"}
    back = RoutingRecord.from_wire(wire)
    assert torch.equal(back.to_dense(), routed) and back.start == 3 and back.num_experts == experts
    assert torch.equal(back.missing_mask(), routed.eq(MISSING).all(-1))


def test_uint8_record_of_256_experts_uses_every_id_and_one_byte_each():
    routed = torch.tensor([[[255, 0]], [[128, 254]]], dtype=torch.int16)
    record = RoutingRecord.from_dense(routed, 256)
    assert record.missing is None
    assert record.nbytes == routed.numel()  # exactly one byte per id
    assert torch.equal(record.to_dense(), routed)
    gapped = torch.cat([routed, torch.full((1, 1, 2), MISSING, dtype=torch.int16)])
    record = RoutingRecord.from_dense(gapped, 256)
    assert record.missing is not None and record.nbytes == gapped.numel() + 1  # plus one mask byte
    assert torch.equal(RoutingRecord.from_wire(record.to_wire()).to_dense(), gapped)


def test_to_dense_aligns_engine_rows_to_positions():
    routed = _routing(5, 2, 2, 8)  # 5 rows: a sequence of 6 tokens in the engine convention
    record = RoutingRecord.from_dense(routed, 8)
    by_position = record.to_dense(length=6)
    assert torch.equal(by_position[:5], routed)
    assert (by_position[5] == MISSING).all()
    assert torch.equal(record.to_dense(length=5), routed)  # rows == tokens is accepted too
    for length in (4, 7, 9):
        with pytest.raises(ValueError, match=f"covers positions \\[0, 5\\) but the sequence has {length} tokens"):
            record.to_dense(length=length)


def test_stitch_appends_turns_and_keeps_earlier_rows():
    whole = _routing(12, 3, 2, 16, seed=4)
    first = RoutingRecord.from_dense(whole[:5], 16)
    second = RoutingRecord.from_dense(whole[5:9], 16, start=5)
    third = RoutingRecord.from_dense(whole[7:12], 16, start=7)  # overlaps rows 7, 8 identically
    stitched = first.stitch(second).stitch(third)
    assert stitched.start == 0 and stitched.end == 12
    assert torch.equal(stitched.to_dense(), whole)
    contained = RoutingRecord.from_dense(whole[2:4], 16, start=2)
    assert stitched.stitch(contained) is stitched


def test_stitch_rejects_disagreeing_overlaps_gaps_and_mismatched_models():
    whole = _routing(10, 3, 2, 16, seed=5)
    first = RoutingRecord.from_dense(whole[:6], 16)
    changed = whole[4:8].clone()
    changed[1, 2] = torch.tensor([15, 14], dtype=changed.dtype)
    if torch.equal(changed[1, 2], whole[5, 2]):
        changed[1, 2] = torch.tensor([13, 12], dtype=changed.dtype)
    with pytest.raises(ValueError, match="overlaps the record at row 5, layer 2 with different experts"):
        first.stitch(RoutingRecord.from_dense(changed, 16, start=4))
    with pytest.raises(ValueError, match=r"rows \[6, 7\) would have no routing"):
        first.stitch(RoutingRecord.from_dense(whole[7:], 16, start=7))
    later = RoutingRecord.from_dense(whole[3:], 16, start=3)
    with pytest.raises(ValueError, match="before the record's first row 3"):
        later.stitch(first)
    with pytest.raises(ValueError, match="cannot stitch routing"):
        first.stitch(RoutingRecord.from_dense(whole[6:], 32, start=6))


def test_validate_names_sample_row_and_layer_for_every_malformed_class():
    base = _routing(6, 3, 2, 8, dense_layers=[1])
    kw = dict(num_layers=3, top_k=2, num_experts=8, moe_layers=frozenset({0, 2}), sample=4)
    validate_routing(base, **kw)
    cases = []
    r = base.clone(); r[2, 0, 1] = 8; cases.append((r, "sample 4, row 2, layer 0: expert id >= num_experts=8"))
    r = base.clone(); r[3, 2, 0] = -2; cases.append((r, "sample 4, row 3, layer 2: negative id"))
    r = base.clone(); r[1, 2, 1] = r[1, 2, 0]; cases.append((r, "sample 4, row 1, layer 2: duplicate"))
    r = base.clone(); r[5, 0, 0] = MISSING; cases.append((r, "sample 4, row 5, layer 0: row partly -1"))
    r = base.clone(); r[0, 1] = torch.tensor([1, 2]); cases.append((r, "sample 4, row 0, layer 1: expert ids in a layer without MoE"))
    cases.append((base[:, :2], "2 layers but the model has num_hidden_layers=3"))
    cases.append((base[..., :1], "top_k 1 but the model routes each token to 2 experts"))
    cases.append((base[0, 0], "expected rank 3"))
    cases.append((base.to(torch.uint16), "not a signed integer dtype or uint8 .*RoutingRecord.to_dense"))
    cases.append((base.float(), "not a signed integer dtype or uint8"))
    for routed, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_routing(routed, **kw)
    with pytest.raises(ValueError, match="int8 is too small for 300 experts"):
        validate_routing(torch.zeros(2, 1, 1, dtype=torch.int8), num_layers=1, top_k=1, num_experts=300)


def test_from_dense_and_from_wire_reject_corrupt_input():
    routed = _routing(4, 2, 2, 8)
    bad = routed.clone(); bad[1, 1, 0] = 9
    with pytest.raises(ValueError, match="sample 3, row 1, layer 1: expert id >= num_experts"):
        RoutingRecord.from_dense(bad, 8, sample=3)
    wire = RoutingRecord.from_dense(routed, 8).to_wire()
    with pytest.raises(ValueError, match="needs 16"):
        RoutingRecord.from_wire(dict(wire, data=wire["data"][:-1]))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        RoutingRecord.from_wire(dict(wire, dtype="int32"))
    with pytest.raises(ValueError, match="does not match 300 experts"):
        RoutingRecord.from_wire(dict(wire, num_experts=300))
    with pytest.raises(ValueError, match="malformed routing wire record"):
        RoutingRecord.from_wire({"data": b""})
    out_of_range = bytes([200]) + wire["data"][1:]
    with pytest.raises(ValueError, match="routing wire record: row 0, layer 0: expert id >= num_experts=8"):
        RoutingRecord.from_wire(dict(wire, data=out_of_range))
    wide = RoutingRecord.from_dense(_routing(2, 1, 2, 300), 300).to_wire()
    partly = bytearray(wide["data"]); partly[2:4] = b"\xff\xff"  # slot 1 of row 0 holds the reserved value
    with pytest.raises(ValueError, match="expert id >= num_experts=300"):
        RoutingRecord.from_wire(dict(wide, data=bytes(partly)))


@pytest.mark.parametrize("values, dtype", [
    ([0, 255], torch.uint8),        # DeepSeek-V3: 256 experts, every id in one byte
    ([0, 7], torch.uint8),
    ([-1, 3], torch.int16),         # -1 markers are not one-byte ids: kept signed
    ([0, 256], torch.int16),
    ([0, 40000], torch.int32),
    ([-40000, 1], torch.int32),
])
def test_compact_rows_is_the_narrowest_exact_dtype(values, dtype):
    from verl_r3.core.record import compact_rows

    routed = torch.tensor(values, dtype=torch.int64).view(1, 1, 2)
    out = compact_rows(routed)
    assert out.dtype == dtype and out.tolist() == routed.tolist()
    assert compact_rows(torch.zeros(0, 4, 2, dtype=torch.int32)).dtype == torch.uint8


@pytest.mark.parametrize("values, dtype", [([0, 299], torch.int16), ([3, 255], torch.uint8), ([0, 40000], torch.int32)])
def test_compact_rows_reads_vllms_uint16_rows(values, dtype):
    """vLLM returns uint16 routing above 256 experts, a dtype torch cannot take the min or max of."""
    from verl_r3.core.record import compact_rows

    routed = torch.from_numpy(np.array(values, dtype=np.uint16).reshape(1, 1, 2))
    out = compact_rows(routed)
    assert out.dtype == dtype and out.tolist() == [[values]]


def test_compact_rows_refuses_values_past_int32():
    from verl_r3.core.record import compact_rows

    with pytest.raises(ValueError, match=r"values from 0 to 4294967295; expert ids and -1 fit int32"):
        compact_rows(torch.tensor([0, 2**32 - 1], dtype=torch.int64).view(1, 1, 2))


def test_validation_in_row_chunks_names_the_offending_sample_and_row(monkeypatch):
    import verl_r3.core.record as record

    monkeypatch.setattr(record, "_VALIDATE_CHUNK_IDS", 2 * 2 * 2)  # two rows of [2 layers, top-2] per chunk
    routed = torch.tensor([[0, 1], [2, 3]]).expand(3, 5, 2, 2).clone()
    validate_routing(routed, num_layers=2, top_k=2, num_experts=4)
    routed[2, 3, 1] = torch.tensor([3, 3])
    routed[1, 4, 0] = torch.tensor([-1, 0])
    with pytest.raises(ValueError, match=r"sample 1, row 4, layer 0: row partly -1"):
        validate_routing(routed, num_layers=2, top_k=2, num_experts=4)
    routed[1, 4, 0] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"sample 2, row 3, layer 1: duplicate expert ids within one row; row is \[3, 3\]"):
        validate_routing(routed, num_layers=2, top_k=2, num_experts=4)


def test_packed_rows_are_named_by_sample_and_own_row():
    # Three sequences of 4, 3 and 5 tokens packed into one row of 12 positions (B == 1).
    starts = [0, 4, 7, 12]

    def locate(flat_row):
        b = max(i for i in range(3) if starts[i] <= flat_row)
        return f"{b} (uid u{b})", flat_row - starts[b]

    routed = torch.tensor([[0, 1], [2, 3]]).expand(1, 12, 2, 2).clone()
    routed[0, 8, 1] = torch.tensor([5, 0])
    with pytest.raises(ValueError, match=r"sample 2 \(uid u2\), row 1, layer 1: expert id >= num_experts=4"):
        validate_routing(routed, num_layers=2, top_k=2, num_experts=4, locate=locate)


def test_zero_rows_of_verls_layout_become_missing_only_where_they_cannot_be_routing():
    from verl_r3.core.record import zero_rows_missing

    routed = torch.tensor([[[0, 0], [0, 3]], [[2, 0], [0, 0]]], dtype=torch.int16)
    assert zero_rows_missing(routed) is routed
    assert routed.tolist() == [[[-1, -1], [0, 3]], [[2, 0], [-1, -1]]]
    top1 = torch.zeros(3, 2, 1, dtype=torch.int16)  # with K == 1, zero is expert 0
    assert zero_rows_missing(top1).eq(0).all()


def test_uint8_routing_marks_missing_rows_with_zeros():
    from verl_r3.core.record import missing_rows

    base = _routing(6, 3, 2, 8, dense_layers=[1])
    compact = base.clamp(min=0).to(torch.uint8)  # -1 rows (the dense layer) become zero rows
    kw = dict(num_layers=3, top_k=2, num_experts=8, moe_layers=frozenset({0, 2}), sample=4)
    validate_routing(compact, **kw)
    assert torch.equal(missing_rows(compact), missing_rows(base))
    r = compact.clone(); r[3, 0] = 0  # a missing row in a MoE layer: fine
    validate_routing(r, **kw)
    r = compact.clone(); r[3, 0] = torch.tensor([0, 5], dtype=torch.uint8)  # expert 0 is a real id
    validate_routing(r, **kw)
    bad = []
    r = compact.clone(); r[2, 2] = torch.tensor([6, 6], dtype=torch.uint8); bad.append((r, "sample 4, row 2, layer 2: duplicate"))
    r = compact.clone(); r[1, 0, 1] = 9; bad.append((r, "sample 4, row 1, layer 0: expert id >= num_experts=8"))
    r = compact.clone(); r[0, 1, 0] = 3; bad.append((r, "sample 4, row 0, layer 1: expert ids in a layer without MoE"))
    bad.append((compact[..., :1], "top_k 1 but the model"))
    for routed, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_routing(routed, **kw)
    with pytest.raises(ValueError, match="uint8 routing marks a missing row with K zeros, which needs top_k >= 2"):
        validate_routing(compact[..., :1], num_layers=3, top_k=1, num_experts=8)
    with pytest.raises(ValueError, match="uint8 is too small for 300 experts"):
        validate_routing(compact, num_layers=3, top_k=2, num_experts=300)
