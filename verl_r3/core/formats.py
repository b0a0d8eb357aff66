"""Converters between each routing producer's layout and ``RoutingRecord``.

The routing contract (dense rows, ``MISSING``, the ``N - 1`` rows convention, ``start``)
is in ``verl_r3.core.record``; every converter validates through it.

Producers: vLLM (``CompletionOutput.routed_experts``), SGLang (``meta_info["routed_experts"]``,
base64 of little-endian int32, or of one or two bytes per id where verl_r3 narrowed it inside
SGLang), verl's padded batch (``routed_experts`` ``[B, S, L, K]``
written by its agent loop) and verl's jagged form (``left_right_2_no_padding``).

Shape suffixes: B batch, S padded positions, N rows, L layers, K top-k, E experts.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import numpy as np
import torch

from verl_r3.core.record import MISSING, RoutingRecord, dense_dtype, zero_rows_missing

__all__ = [
    "from_nested",
    "from_sglang",
    "from_verl_batch",
    "from_vllm",
    "sglang_compact_dtype",
    "sglang_ids",
    "sglang_rows",
    "to_nested",
    "to_sglang",
    "to_verl_batch",
    "to_vllm",
]

_INT64_MAX = torch.iinfo(torch.int64).max
_UNSIGNED_TO_SIGNED_TORCH = {torch.uint8: torch.int16, torch.uint16: torch.int32}
_SIGNED_TORCH = (torch.int8, torch.int16, torch.int32, torch.int64)


def _who(sample: int | None) -> str:
    return f"sample {sample}: " if sample is not None else ""


def _is_unsigned(routed) -> bool:
    if isinstance(routed, torch.Tensor):
        return not routed.dtype.is_signed and routed.dtype != torch.bool
    return np.asarray(routed).dtype.kind == "u"


def _signed_tensor(routed, num_experts: int, sample: int | None, what: str) -> torch.Tensor:
    """Integer array/tensor of any dtype -> signed CPU-or-same-device tensor wide enough for
    ``num_experts`` ids and ``MISSING``, without wrapping any value."""
    if isinstance(routed, torch.Tensor) and routed.dtype in (torch.uint32, torch.uint64):
        routed = routed.cpu().numpy()  # torch lacks reductions on these; numpy checks the range
    if not isinstance(routed, torch.Tensor):
        arr = np.asarray(routed)
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{_who(sample)}{what} must hold integers, got dtype {arr.dtype}")
        if arr.dtype.kind == "u":
            if arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > _INT64_MAX:
                raise ValueError(f"{_who(sample)}{what}: id {int(arr.max())} does not fit int64")
            target = np.int64 if arr.dtype.itemsize >= 4 else np.result_type(arr.dtype, np.int8)
        else:
            target = arr.dtype
        arr = np.array(arr, dtype=target, copy=True, order="C")  # writable, contiguous
        routed = torch.from_numpy(arr)
    if routed.dtype in _UNSIGNED_TO_SIGNED_TORCH:
        routed = routed.to(_UNSIGNED_TO_SIGNED_TORCH[routed.dtype])
    if routed.dtype not in _SIGNED_TORCH:
        raise ValueError(f"{_who(sample)}{what} must hold integers, got dtype {routed.dtype}")
    if torch.iinfo(routed.dtype).max < num_experts - 1:
        routed = routed.to(torch.promote_types(routed.dtype, dense_dtype(num_experts)))
    return routed


def _record_dims(records: Sequence[RoutingRecord]) -> tuple[int, int, int]:
    """``(L, K, E)`` shared by all records; ValueError naming the first sample that differs."""
    if len(records) == 0:
        raise ValueError("no records given: cannot infer (layers, top_k, experts)")
    dims = (records[0].num_layers, records[0].top_k, records[0].num_experts)
    for b, record in enumerate(records):
        own = (record.num_layers, record.top_k, record.num_experts)
        if own != dims:
            raise ValueError(f"sample {b}: (layers, top_k, experts)={own} differs from sample 0's {dims}")
    return dims


def _place(record: RoutingRecord, length: int, dtype: torch.dtype, sample: int) -> torch.Tensor:
    """The record's own rows, after checking they fit a sequence of ``length`` tokens."""
    try:
        by_position = record.to_dense(length=length, dtype=dtype)  # enforces the end-at-N-1-or-N rule
    except ValueError as exc:
        raise ValueError(f"sample {sample}: {exc}") from exc
    return by_position[record.start : record.end]


def _row_counts(rows: Sequence[int] | None, n_B: list[int], what: str) -> list[int]:
    if rows is None:
        return [max(n - 1, 0) for n in n_B]
    rows = [int(r) for r in rows]
    if len(rows) != len(n_B):
        raise ValueError(f"rows has {len(rows)} entries for a batch of {len(n_B)} samples")
    for b, (r, n) in enumerate(zip(rows, n_B)):
        if not 0 <= r <= n:
            raise ValueError(f"sample {b}: rows={r} outside [0, {n}] ({n} {what})")
    return rows


# -- vLLM ---------------------------------------------------------------------------------


def from_vllm(
    routed_experts,
    num_experts: int,
    *,
    layer_map: Sequence[int] | None = None,
    num_layers: int | None = None,
    sample: int | None = None,
) -> RoutingRecord:
    """vLLM's ``CompletionOutput.routed_experts`` ``[N - 1, L', K]`` (numpy or torch, any
    integer dtype) -> record starting at row 0.

    ``layer_map[j]`` is the absolute decoder layer of producer layer ``j`` when the engine
    reports only MoE layers; ``num_layers`` (the model's ``num_hidden_layers``) is then
    required and unmapped layers are ``MISSING``. Without ``layer_map``, ``L'`` is taken
    as is (checked against ``num_layers`` when given).

    vLLM 0.32 returns every decoder layer in ``uint8`` (``uint16`` above 256 experts) and
    leaves the rows of layers without MoE at zero. In unsigned input with ``K >= 2`` a row of
    ``K`` zeros is therefore read as ``MISSING`` (ids in a row are distinct, so it is no
    routing). With ``K == 1`` zero is expert 0: pass the MoE layers' columns with
    ``layer_map`` instead.
    """
    unsigned = _is_unsigned(routed_experts)
    routed = _signed_tensor(routed_experts, num_experts, sample, "vLLM routed_experts")
    if unsigned:
        zero_rows_missing(routed)  # a new tensor: _signed_tensor widened the caller's
    if routed.dim() != 3:
        raise ValueError(
            f"{_who(sample)}vLLM routed_experts must be [rows, layers, top_k], got shape {tuple(routed.shape)}"
        )
    rows, producer_layers, top_k = routed.shape
    if layer_map is None:
        if num_layers is not None and producer_layers != num_layers:
            raise ValueError(
                f"{_who(sample)}vLLM routed_experts has {producer_layers} layers but num_layers={num_layers} "
                "(engine reports MoE layers only? pass layer_map)"
            )
        return RoutingRecord.from_dense(routed, num_experts, sample=sample)
    if num_layers is None:
        raise ValueError(f"{_who(sample)}layer_map needs num_layers (the model's num_hidden_layers)")
    layers = torch.as_tensor(np.asarray(layer_map, dtype=np.int64).reshape(-1))
    if layers.numel() != producer_layers:
        raise ValueError(
            f"{_who(sample)}layer_map has {layers.numel()} entries but routed_experts has {producer_layers} layers"
        )
    if layers.unique().numel() != layers.numel() or bool(((layers < 0) | (layers >= num_layers)).any()):
        raise ValueError(
            f"{_who(sample)}layer_map {layers.tolist()} must be distinct layers in [0, num_layers={num_layers})"
        )
    full_NLK = torch.full((rows, num_layers, top_k), MISSING, dtype=routed.dtype, device=routed.device)
    full_NLK[:, layers.to(routed.device)] = routed
    return RoutingRecord.from_dense(full_NLK, num_experts, moe_layers=frozenset(layers.tolist()), sample=sample)


def to_vllm(record: RoutingRecord) -> np.ndarray:
    """Record -> int32 ``[rows, L, K]`` with -1 for missing rows, vLLM's row layout (no offset) in the
    signed form. vLLM 0.32 itself returns ``uint8`` (``uint16`` above 256 experts) with zeros for
    layers without MoE; ``from_vllm`` reads both."""
    if record.start != 0:
        raise ValueError(f"vLLM routing has no row offset, but the record starts at row {record.start}")
    return record.to_dense(dtype=torch.int32).numpy()


# -- SGLang -------------------------------------------------------------------------------


def from_sglang(
    b64: str | bytes,
    *,
    num_layers: int,
    top_k: int,
    num_experts: int,
    start: int = 0,
    rows: int | None = None,
    sample: int | None = None,
) -> RoutingRecord:
    """SGLang's ``meta_info["routed_experts"]`` (base64 of ``[rows, L, K]`` covering positions
    ``[start, start + rows)``; ``start`` is the request's ``routed_experts_start_len``) -> record.

    Without ``rows`` the payload is read as SGLang's own little-endian ``int32``. With ``rows``
    (``sglang_rows`` of the output's ``meta_info``) the width of an id follows from the length,
    so payloads narrowed inside SGLang (``sglang_compact_dtype``) read as well; see ``sglang_ids``.

    SGLang captures into a zero-initialised buffer that layers without MoE never write, so with
    ``K >= 2`` a row of ``K`` zeros is read as ``MISSING`` (a row's ids are distinct). With
    ``K == 1`` zero is expert 0."""
    ids = sglang_ids(b64, num_layers=num_layers, top_k=top_k, rows=rows, who=_who(sample))
    if ids.dtype == torch.uint8:
        ids = ids.to(torch.int16)  # signed, for MISSING
    routed_NLK = zero_rows_missing(ids)
    return RoutingRecord.from_dense(routed_NLK, num_experts, start=start, sample=sample)


# Bytes per id in an SGLang routing payload -> its dtype: SGLang's own int32, or verl_r3's compact forms.
_SGLANG_WIDTHS = {1: "<u1", 2: "<i2", 4: "<i4"}


def sglang_compact_dtype(num_experts: int) -> torch.dtype | None:
    """The dtype routing of a model with ``num_experts`` experts takes inside SGLang when verl_r3
    narrows it there (``verl_r3.patches.sglang_compact_routing_0_5``): ``uint8`` up to 255
    experts, ``int16`` up to 32767, None (SGLang's ``int32`` kept) above.

    Every id is first clamped to ``[-1, num_experts]``, so an id outside ``[0, num_experts)``
    arrives as one too (``num_experts``, or -1: 255 in ``uint8``) and the reader's range check
    still catches it. That needs a value of the dtype past the last expert, which is why 256
    experts take ``int16`` here; verl's server still hands them on as ``uint8``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if num_experts <= torch.iinfo(torch.uint8).max:
        return torch.uint8
    if num_experts <= torch.iinfo(torch.int16).max:
        return torch.int16
    return None


def sglang_rows(meta_info: dict, start: int = 0, *, who: str = "") -> int:
    """The routing rows SGLang returns for one finished output: positions
    ``[start, prompt + completion - 1)`` from ``meta_info``'s ``prompt_tokens`` and
    ``completion_tokens``, ``start`` being the request's ``routed_experts_start_len`` (SGLang
    caps it at the last position). ValueError, its message starting with ``who``, when
    ``meta_info`` lacks the counts."""
    try:
        seqlen = int(meta_info["prompt_tokens"]) + int(meta_info["completion_tokens"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{who}SGLang meta_info has no usable prompt_tokens and completion_tokens ({exc!r}); "
                         "they give the number of routing rows: pass the output's meta_info whole") from exc
    if start < 0:
        raise ValueError(f"{who}routed_experts_start_len must be non-negative, got {start}")
    return max(0, seqlen - 1 - min(start, max(seqlen - 1, 0)))


def sglang_ids(b64: str | bytes, *, num_layers: int, top_k: int, rows: int | None = None,
               who: str = "") -> torch.Tensor:
    """SGLang's ``meta_info["routed_experts"]`` (base64) -> a writable tensor ``[rows, L, K]``
    holding exactly what SGLang wrote (zero rows kept), in the payload's own dtype.

    Without ``rows`` the payload is SGLang's little-endian ``int32``. With ``rows`` an id takes
    ``bytes / (rows x L x K)`` bytes: 4 (``int32``, SGLang's own), or 1 (``uint8``) or 2
    (``int16``), the forms ``sglang_compact_dtype`` gives. ``ValueError``, its message starting
    with ``who``, for input that is not base64 or whose length fits neither."""
    if isinstance(b64, str):
        try:
            b64 = b64.encode("ascii")
        except UnicodeEncodeError as exc:
            raise ValueError(f"{who}SGLang routed_experts is not valid base64: {exc}") from exc
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, TypeError) as exc:
        raise ValueError(f"{who}SGLang routed_experts is not valid base64: {exc}") from exc
    ids_per_row = num_layers * top_k
    if ids_per_row <= 0:
        raise ValueError(f"{who}num_layers={num_layers} and top_k={top_k} must be positive")
    if rows is None:
        width = 4
        if len(raw) % (width * ids_per_row):
            raise ValueError(
                f"{who}SGLang routed_experts has {len(raw)} bytes, not a multiple of "
                f"{width * ids_per_row} (4 bytes x num_layers={num_layers} x top_k={top_k})"
            )
    elif not raw:
        width = 4  # no rows: nothing to tell the width by, nor to read
        if rows:
            raise ValueError(f"{who}SGLang routed_experts is empty, but the output has {rows} routed rows")
    else:
        ids = rows * ids_per_row
        width = len(raw) // ids if ids and len(raw) % ids == 0 else 0
        if width not in _SGLANG_WIDTHS:
            raise ValueError(
                f"{who}SGLang routed_experts has {len(raw)} bytes for {rows} rows x num_layers={num_layers} x "
                f"top_k={top_k} ids: not 1, 2 or 4 bytes per id (the output's token counts and its routing "
                "disagree)"
            )
    little_endian = _SGLANG_WIDTHS[width]
    flat = np.frombuffer(raw, dtype=little_endian).astype(little_endian[1:], copy=True)  # native order, writable
    return torch.from_numpy(flat).reshape(-1, num_layers, top_k)


def to_sglang(record: RoutingRecord) -> tuple[str, int]:
    """Record -> (base64 of little-endian int32 ``[rows, L, K]``, start)."""
    raw = record.to_dense(dtype=torch.int32).numpy().astype("<i4", copy=False).tobytes()
    return base64.b64encode(raw).decode("ascii"), record.start


# -- verl padded batch --------------------------------------------------------------------


def _valid_spans(attention_mask_BS: torch.Tensor) -> tuple[list[int], list[int]]:
    """First valid position and valid count per sample; ValueError naming the first sample
    whose valid positions are not one contiguous run."""
    if attention_mask_BS.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, positions], got shape {tuple(attention_mask_BS.shape)}")
    valid_BS = attention_mask_BS.bool()
    n_B = valid_BS.sum(dim=1)
    first_B = valid_BS.to(torch.int8).argmax(dim=1)
    pos_S = torch.arange(valid_BS.shape[1], device=valid_BS.device)
    span_BS = (pos_S >= first_B[:, None]) & (pos_S < (first_B + n_B)[:, None])
    broken_B = (span_BS != valid_BS).any(dim=1)
    if bool(broken_B.any()):
        b = int(broken_B.nonzero()[0])
        holes = (~valid_BS[b] & span_BS[b]).nonzero().flatten().tolist()
        raise ValueError(
            f"sample {b}: attention_mask valid positions are not one contiguous run "
            f"(padding at positions {holes[:8]} inside the span)"
        )
    return first_B.tolist(), n_B.tolist()


def from_verl_batch(
    routed_BSLK: torch.Tensor,
    attention_mask_BS: torch.Tensor,
    num_experts: int,
    *,
    rows: Sequence[int] | None = None,
) -> list[RoutingRecord]:
    """verl's padded ``routed_experts`` ``[B, S, L, K]`` -> one record per sample.

    Sample ``b``'s record holds the rows of its first ``n - 1`` valid positions (``n`` valid
    tokens), start 0 relative to the first valid token; verl's zero rows (the last token's,
    and padding) are never read, and zero rows among them (rows the engine did not return, e.g.
    the tool tokens after a multi-turn engine stopped recording) are ``MISSING`` when ``K >= 2``
    (``verl_r3.core.record``, "Routing in verl's batches"). ``rows[b]`` (``<= n``) takes that
    many rows instead.
    """
    if routed_BSLK.dim() != 4 or tuple(routed_BSLK.shape[:2]) != tuple(attention_mask_BS.shape):
        raise ValueError(
            f"routed_experts must be [batch, positions, layers, top_k] matching attention_mask "
            f"{tuple(attention_mask_BS.shape)}, got {tuple(routed_BSLK.shape)}"
        )
    first_B, n_B = _valid_spans(attention_mask_BS)
    rows_B = _row_counts(rows, n_B, "valid tokens")
    records = []
    for b, (first, r) in enumerate(zip(first_B, rows_B)):
        routed_NLK = _signed_tensor(routed_BSLK[b, first : first + r], num_experts, b, "routed_experts")
        records.append(RoutingRecord.from_dense(zero_rows_missing(routed_NLK.clone()), num_experts, sample=b))
    return records


def to_verl_batch(
    records: Sequence[RoutingRecord],
    attention_mask_BS: torch.Tensor,
    *,
    dtype: torch.dtype = torch.int16,
    pad: int = MISSING,
) -> torch.Tensor:
    """Records -> verl's ``[B, S, L, K]`` layout: sample ``b``'s rows at its first valid
    position + ``record.start``. Positions without a row hold ``pad`` (``MISSING`` by default;
    ``pad=0`` reproduces verl's own zero padding)."""
    num_layers, top_k, _ = _record_dims(records)
    if len(records) != attention_mask_BS.shape[0]:
        raise ValueError(f"{len(records)} records for an attention_mask of {attention_mask_BS.shape[0]} samples")
    first_B, n_B = _valid_spans(attention_mask_BS)
    out_BSLK = torch.full(
        (len(records), attention_mask_BS.shape[1], num_layers, top_k), pad, dtype=dtype, device=attention_mask_BS.device
    )
    for b, (record, first, n) in enumerate(zip(records, first_B, n_B)):
        out_BSLK[b, first + record.start : first + record.end] = _place(record, n, dtype, b)
    return out_BSLK


# -- verl jagged (nested) form ------------------------------------------------------------


def from_nested(
    routed_nested: torch.Tensor,
    num_experts: int,
    *,
    rows: Sequence[int] | None = None,
) -> list[RoutingRecord]:
    """verl's jagged ``routed_experts`` (component ``b`` has ``n`` rows for ``n`` valid
    tokens, the last one verl's zero row) -> one record per sample of its first ``n - 1``
    rows, or ``rows[b]`` rows when given; zero rows among them are ``MISSING`` as in
    :func:`from_verl_batch`."""
    if not (isinstance(routed_nested, torch.Tensor) and routed_nested.is_nested):
        raise ValueError("routed_experts must be a nested (jagged) tensor")
    if routed_nested.layout != torch.jagged:
        raise ValueError(f"routed_experts must use the jagged layout, got {routed_nested.layout}")
    values_NLK = routed_nested.values()
    if values_NLK.dim() != 3:
        raise ValueError(
            f"nested routed_experts components must be [rows, layers, top_k], got values {tuple(values_NLK.shape)}"
        )
    offsets = routed_nested.offsets().tolist()
    n_B = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    rows_B = _row_counts(rows, n_B, "rows in the component")
    records = []
    for b, (lo, r) in enumerate(zip(offsets[:-1], rows_B)):
        routed_NLK = _signed_tensor(values_NLK[lo : lo + r], num_experts, b, "routed_experts")
        records.append(RoutingRecord.from_dense(zero_rows_missing(routed_NLK.clone()), num_experts, sample=b))
    return records


def to_nested(
    records: Sequence[RoutingRecord],
    lengths: Sequence[int],
    *,
    dtype: torch.dtype = torch.int16,
    pad: int = MISSING,
) -> torch.Tensor:
    """Records -> jagged tensor whose component ``b`` has ``lengths[b]`` rows (the record's rows
    at ``record.start``, ``pad`` elsewhere), with int32 offsets like verl's ``cu_seqlens``."""
    num_layers, top_k, _ = _record_dims(records)
    lengths = [int(n) for n in lengths]
    if len(lengths) != len(records):
        raise ValueError(f"{len(records)} records but {len(lengths)} lengths")
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be >= 0, got {lengths}")
    offsets = [0, *np.cumsum(lengths).tolist()]
    values_NLK = torch.full((offsets[-1], num_layers, top_k), pad, dtype=dtype)
    for b, (record, lo, n) in enumerate(zip(records, offsets[:-1], lengths)):
        values_NLK[lo + record.start : lo + record.end] = _place(record, n, dtype, b)
    return torch.nested.nested_tensor_from_jagged(values_NLK, offsets=torch.tensor(offsets, dtype=torch.int32))
