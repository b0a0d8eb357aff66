"""The routing record: the one contract for routing tensors in verl_r3.

Every other module refers here instead of restating it.

Legend for shape suffixes: B samples, T positions of a padded batch, N rows of one
sequence, L decoder layers, K experts per token, E experts of the model.

Dense routing (what replay consumes and record produces)
--------------------------------------------------------
* The routing of one sequence is a signed integer tensor ``[N, L, K]``; a batch is
  ``[B, T, L, K]``.
* Row ``i`` is the routing of *input* position ``i``: the experts token ``i`` was sent to
  when it was fed to the model.
* Layer ``l`` is the absolute decoder-layer index, ``0 <= l < config.num_hidden_layers``.
  Layers without MoE (DeepSeek-V3's first dense layers, Qwen's ``mlp_only_layers``) keep
  their slot and hold ``MISSING`` in every row.
* The ``K`` slots hold distinct logical expert ids in ``[0, E)`` (before any
  expert-parallel placement). Their order is kept but carries no meaning for replay.
* ``MISSING`` (-1) in *all* K slots means "no routing recorded for this token in this
  layer": replay falls back to the trainer's native top-k for exactly that (token, layer)
  and counts it. A row that is only partly -1 is malformed.
* Dense routing may also be ``uint8`` (models with at most 256 experts and ``K >= 2``): then
  a row of ``K`` zeros is the missing row (distinct ids make it impossible as routing), the
  convention of verl's batches below. What verl_r3's FSDP engine replays, at one byte per id
  whatever the expert count. ``missing_rows`` reads either form.

Alignment with rollout engines
------------------------------
A sequence of ``N`` tokens (prompt + response) yields ``N - 1`` rows from an engine: the
last sampled token is never fed back into the model, so it has no routing. Row ``i``
still belongs to position ``i``; a training forward over all ``N`` tokens finds no row
for position ``N - 1`` and treats it as ``MISSING`` (its logits predict nothing that is
trained). A record therefore fits a sequence of ``N`` tokens when it ends at row ``N - 1``
or ``N``; anything else is a shape error (for example a response truncated after
generation while its routing was not).

A record may start at a row offset ``start`` (multi-turn: a turn only adds the rows of its
new tokens); its rows then cover positions ``[start, start + rows)``.

Routing in verl's batches
-------------------------
verl's agent loop lays each sample's routing over all its tokens and fills the rows the
engine did not return with zeros (the last token's, tokens after an engine stopped
recording, a sample whose engine returned none). With ``K >= 2`` a row of ``K`` zeros is not
routing (ids are distinct), so readers of that layout take it as ``MISSING``
(``zero_rows_missing``): those tokens get the fallback, counted like any missing row. With
``K == 1`` zero is a real expert; verl_r3's agent-loop patch pads such routing with -1 instead.

Compact storage and wire encoding
---------------------------------
* ``uint8`` when ``E <= 256``. All 256 values may be real ids (DeepSeek-V3 has 256
  experts), so missing (row, layer) pairs are kept out of band in a bool mask ``[N, L]``
  (``None`` when nothing is missing) and the ids there are 0.
* ``uint16`` when ``256 < E <= 65535``; the value ``UINT16_MISSING`` (65535) is reserved
  and marks missing pairs in band (all K slots).
* The wire form (``RoutingRecord.to_wire``) is a dict of plain values: ``data`` (raw
  ids in host byte order, little-endian on every platform verl runs on), ``shape`` ``[N, L, K]``, ``dtype`` (``"uint8"``/``"uint16"``),
  ``start``, ``num_experts`` and ``missing`` (the mask packed 8 pairs a byte, or
  ``None``). It round-trips exactly.

Converters from each engine's and verl's own layouts live in ``verl_r3.core.formats``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "MISSING",
    "UINT16_MISSING",
    "RoutingRecord",
    "compact_rows",
    "dense_dtype",
    "missing_rows",
    "narrow_dtype",
    "storage_dtype",
    "validate_routing",
    "zero_rows_missing",
]

MISSING = -1
UINT16_MISSING = 0xFFFF
_MAX_EXPERTS = UINT16_MISSING  # ids 0..65534, 65535 reserved

_SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_DENSE_DTYPES = (*_SIGNED_INT_DTYPES, torch.uint8)


def storage_dtype(num_experts: int) -> torch.dtype:
    """Compact dtype for a model with ``num_experts`` experts (see the module docstring)."""
    if num_experts < 1 or num_experts > _MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {_MAX_EXPERTS}], got {num_experts}")
    return torch.uint8 if num_experts <= 256 else torch.uint16


def dense_dtype(num_experts: int) -> torch.dtype:
    """Narrowest signed dtype of dense routing that verl's batches also use (int16 when it fits)."""
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32


def narrow_dtype(num_experts: int) -> torch.dtype:
    """Narrowest signed dtype holding every id of ``num_experts`` experts and -1: ``int8`` up to
    128 experts (Qwen3-MoE, OLMoE, Mixtral), else :func:`dense_dtype`. What the FSDP engine
    replays a micro-batch in."""
    return torch.int8 if num_experts <= torch.iinfo(torch.int8).max + 1 else dense_dtype(num_experts)


def compact_rows(routed: torch.Tensor) -> torch.Tensor:
    """Engine rows ``[..., K]`` in the narrowest dtype that holds every value exactly.

    ``uint8`` when all values lie in ``[0, 256)`` (any model with at most 256 experts whose
    engine writes zeros, not -1, in layers without MoE: vLLM, SGLang, verl_r3's ``hf`` engine);
    otherwise ``int16``, or ``int32`` past its range (``ValueError`` past that). Rows of any
    integer dtype are read, vLLM's ``uint16`` (above 256 experts) included. Lossless: which rows
    are missing and which layers have no router is decided where the rows are replayed, not
    here. The carriage form of routing in verl's batches
    (``verl_r3.patches.verl_agent_loop_routing_0_9``).
    """
    if routed.dtype == torch.uint8:
        return routed
    if routed.numel() == 0:
        return routed.to(torch.uint8)
    if not routed.dtype.is_signed:
        # vLLM returns uint16 above 256 experts; torch reduces no unsigned dtype but uint8.
        routed = routed.to(torch.int64)
    low, high = (int(v) for v in torch.aminmax(routed))
    if low >= 0 and high <= 255:
        return routed.to(torch.uint8)
    if torch.iinfo(torch.int16).min <= low and high <= torch.iinfo(torch.int16).max:
        return routed.to(torch.int16)
    if low < torch.iinfo(torch.int32).min or high > torch.iinfo(torch.int32).max:
        raise ValueError(f"routing holds values from {low} to {high}; expert ids and -1 fit int32, these do not")
    return routed.to(torch.int32)


def missing_rows(routed: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., L]`` of dense routing ``[..., L, K]``: True where the row is missing (``K`` times
    ``MISSING``, or ``K`` zeros in ``uint8`` routing)."""
    return (routed == (0 if routed.dtype == torch.uint8 else MISSING)).all(dim=-1)


def zero_rows_missing(routed: torch.Tensor) -> torch.Tensor:
    """Mark the rows of verl's zero fill ``MISSING`` in place (see "Routing in verl's batches"):
    every ``[..., K]`` row of ``K >= 2`` zeros. ``routed`` must be signed; returned for chaining."""
    if routed.shape[-1] >= 2 and routed.numel():
        routed.masked_fill_((routed == 0).all(dim=-1, keepdim=True), MISSING)
    return routed


def _where(flat_row: int, layer: int, width: int | None, sample: int | None, locate) -> str:
    """Where flat row ``flat_row`` (of the ``[-1, L, K]`` view) lies, in the caller's terms."""
    if locate is not None:
        who, row = locate(flat_row)
        return f"sample {who}, row {row}, layer {layer}"
    if width is not None:
        b, t = divmod(flat_row, width)
        return f"sample {b}, row {t}, layer {layer}"
    prefix = f"sample {sample}, " if sample is not None else ""
    return f"{prefix}row {flat_row}, layer {layer}"


def validate_routing(
    routed: torch.Tensor,
    *,
    num_layers: int,
    top_k: int,
    num_experts: int,
    moe_layers: frozenset[int] | None = None,
    sample: int | None = None,
    what: str = "routing",
    locate: Callable[[int], tuple[object, int]] | None = None,
) -> None:
    """Check dense routing against the contract above; raise ``ValueError`` naming the
    first offending sample, row and layer.

    ``routed`` is ``[N, L, K]`` (one sequence; ``sample`` names it in errors) or
    ``[B, T, L, K]``. ``moe_layers``, when given, are the layers that have a router: every
    other layer must be ``MISSING`` throughout (anything else means routing from another
    model or a wrong layer mapping). ``locate``, when given, maps a row of the flattened
    ``[B * T]`` (or ``[N]``) rows to ``(sample, row within that sample)`` for the error, e.g.
    for several sequences packed into one (``B == 1``), where position ``t`` alone names no
    sample.
    """
    if not isinstance(routed, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(routed).__name__}")
    if routed.dtype not in _DENSE_DTYPES:
        hint = " (compact storage cannot hold -1: use RoutingRecord.to_dense())" if routed.dtype == torch.uint16 else ""
        raise ValueError(f"{what}: dtype {routed.dtype} is not a signed integer dtype or uint8{hint}")
    if torch.iinfo(routed.dtype).max < num_experts - 1:
        raise ValueError(
            f"{what}: dtype {routed.dtype} is too small for {num_experts} experts "
            f"(largest id {num_experts - 1}); use {dense_dtype(num_experts)}"
        )
    if routed.dim() not in (3, 4):
        raise ValueError(
            f"{what}: expected rank 3 [rows, layers, top_k] or rank 4 [batch, positions, layers, top_k], "
            f"got shape {tuple(routed.shape)}"
        )
    if routed.shape[-2] != num_layers:
        raise ValueError(
            f"{what}: {routed.shape[-2]} layers but the model has num_hidden_layers={num_layers} "
            f"(shape {tuple(routed.shape)}; routing from a different model or a MoE-only layer axis?)"
        )
    if routed.shape[-1] != top_k:
        raise ValueError(
            f"{what}: top_k {routed.shape[-1]} but the model routes each token to {top_k} experts "
            f"(shape {tuple(routed.shape)})"
        )
    if routed.dtype == torch.uint8 and top_k < 2:
        raise ValueError(f"{what}: uint8 routing marks a missing row with K zeros, which needs top_k >= 2; "
                         f"use a signed dtype (-1 marks missing rows)")
    if routed.numel() == 0:
        return
    batched = routed.dim() == 4
    rows = routed.reshape(-1, num_layers, top_k)  # a view for contiguous routing
    dense = None
    if moe_layers is not None:
        dense = torch.tensor([layer not in moe_layers for layer in range(num_layers)], device=routed.device)
    # Row chunks bound the checks' temporaries (a sort's int64 indices among them) to a few MB
    # whatever the batch; the flags stay on the device until one read at the end.
    chunk = max(1, _VALIDATE_CHUNK_IDS // (num_layers * top_k))
    flags = None
    for begin in range(0, rows.shape[0], chunk):
        found = torch.stack([mask.any() for _, mask in _routing_checks(rows[begin:begin + chunk], num_experts, dense)])
        flags = found if flags is None else flags | found
    if not bool(flags.any()):
        return
    width = routed.shape[1] if batched else None
    for begin in range(0, rows.shape[0], chunk):
        part = rows[begin:begin + chunk]
        for cause, mask in _routing_checks(part, num_experts, dense):
            if bool(mask.any()):
                r, layer = mask.nonzero()[0].tolist()[:2]
                r += begin
                where = _where(r, layer, width, sample, locate)
                raise ValueError(f"{what}: {where}: {cause}; row is {rows[r, layer].tolist()}")


#: Ids validated at once (each costs about 13 bytes of temporaries).
_VALIDATE_CHUNK_IDS = 1 << 18


def _routing_checks(rows: torch.Tensor, num_experts: int, dense: torch.Tensor | None) -> list[tuple[str, torch.Tensor]]:
    """(cause, bool [rows, L] mask) of every contract violation in ``rows`` ``[R, L, K]``, in the order reported."""
    missing_row = missing_rows(rows)
    checks = [(f"expert id >= num_experts={num_experts}", (rows >= num_experts).any(dim=-1))]
    if rows.dtype != torch.uint8:  # uint8 routing holds no negative ids, and zeros mark its missing rows
        partly = (rows == MISSING).any(dim=-1) & ~missing_row
        checks[:0] = [("negative id other than the missing marker -1", (rows < MISSING).any(dim=-1))]
        checks.append(("row partly -1 (a missing row must be -1 in all K slots)", partly))
    sorted_ids = rows.sort(dim=-1).values
    dup = (sorted_ids[..., 1:] == sorted_ids[..., :-1]).any(dim=-1) & ~missing_row
    checks.append(("duplicate expert ids within one row", dup))
    if dense is not None:
        checks.append(
            ("expert ids in a layer without MoE (routing from another model or wrong layer map)", ~missing_row & dense)
        )
    return checks


@dataclass(frozen=True, eq=False)
class RoutingRecord:
    """Compact routing of one sequence (contract in the module docstring).

    ``ids`` is ``[N, L, K]`` uint8/uint16; ``missing`` a bool ``[N, L]`` mask for uint8
    storage (``None`` when nothing is missing); rows cover positions ``[start, start + N)``.
    """

    ids: torch.Tensor
    missing: torch.Tensor | None
    num_experts: int
    start: int = 0

    def __post_init__(self) -> None:
        expected = storage_dtype(self.num_experts)
        if self.ids.dtype != expected:
            raise ValueError(f"ids dtype {self.ids.dtype} does not match {self.num_experts} experts ({expected})")
        if self.ids.dim() != 3:
            raise ValueError(f"ids must be [rows, layers, top_k], got {tuple(self.ids.shape)}")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if self.missing is not None:
            if expected != torch.uint8:
                raise ValueError("uint16 records mark missing rows in band; missing must be None")
            if self.missing.dtype != torch.bool or tuple(self.missing.shape) != tuple(self.ids.shape[:2]):
                raise ValueError(
                    f"missing must be bool [rows, layers]={tuple(self.ids.shape[:2])}, "
                    f"got {self.missing.dtype} {tuple(self.missing.shape)}"
                )

    # -- shape ---------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids.shape[2]

    @property
    def end(self) -> int:
        """One past the last position covered."""
        return self.start + self.rows

    @property
    def nbytes(self) -> int:
        """Bytes held: ids plus the missing mask as transported (one bit per pair)."""
        mask_bytes = 0 if self.missing is None else (self.missing.numel() + 7) // 8
        return self.ids.numel() * self.ids.element_size() + mask_bytes

    # -- dense <-> compact ---------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        routed_NLK: torch.Tensor,
        num_experts: int,
        *,
        start: int = 0,
        moe_layers: frozenset[int] | None = None,
        sample: int | None = None,
    ) -> RoutingRecord:
        """Validate dense ``[N, L, K]`` routing and store it compactly."""
        if routed_NLK.dim() != 3:
            prefix = f"sample {sample}: " if sample is not None else ""
            raise ValueError(f"{prefix}expected one sequence [rows, layers, top_k], got {tuple(routed_NLK.shape)}")
        validate_routing(
            routed_NLK,
            num_layers=routed_NLK.shape[1],
            top_k=routed_NLK.shape[2],
            num_experts=num_experts,
            moe_layers=moe_layers,
            sample=sample,
        )
        dtype = storage_dtype(num_experts)
        missing_NL = (routed_NLK == MISSING).all(dim=-1)
        routed_NLK = routed_NLK.cpu()
        missing_NL = missing_NL.cpu()
        if dtype == torch.uint8:
            ids = routed_NLK.clamp(min=0).to(torch.uint8)
            return cls(ids, missing_NL if bool(missing_NL.any()) else None, num_experts, start)
        wide = routed_NLK.to(torch.int32)
        ids = torch.where(wide == MISSING, UINT16_MISSING, wide).to(torch.uint16)
        return cls(ids, None, num_experts, start)

    def missing_mask(self) -> torch.Tensor:
        """Bool ``[N, L]``: True where no routing is recorded."""
        if self.ids.dtype == torch.uint16:
            return (self.ids == UINT16_MISSING).all(dim=-1)
        if self.missing is None:
            return torch.zeros(self.ids.shape[:2], dtype=torch.bool)
        return self.missing

    def to_dense(self, *, length: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense signed routing.

        Without ``length``: the record's own rows ``[N, L, K]``. With ``length`` (the number of
        tokens of the sequence): ``[length, L, K]`` indexed by position, rows outside
        ``[start, end)`` ``MISSING``; raises unless the record ends at ``length - 1`` or
        ``length`` (see "Alignment" above).
        """
        dtype = dtype or dense_dtype(self.num_experts)
        if dtype not in _SIGNED_INT_DTYPES or torch.iinfo(dtype).max < self.num_experts - 1:
            raise ValueError(f"dtype {dtype} cannot hold ids of {self.num_experts} experts and -1")
        routed = self.ids.to(torch.int32)
        routed = routed.masked_fill(self.missing_mask().unsqueeze(-1), MISSING).to(dtype)
        if length is None:
            return routed
        if self.end not in (length - 1, length):
            raise ValueError(
                f"routing covers positions [{self.start}, {self.end}) but the sequence has {length} tokens: "
                f"a record must end at row {length - 1} (engine convention) or {length} "
                "(truncated response with untruncated routing, or the reverse?)"
            )
        out = torch.full((length, self.num_layers, self.top_k), MISSING, dtype=dtype)
        out[self.start : self.end] = routed
        return out

    # -- wire ----------------------------------------------------------------------------
    def to_wire(self) -> dict:
        """Lossless plain-value encoding (see the module docstring)."""
        missing = None
        if self.missing is not None:
            bits = torch.zeros(((self.missing.numel() + 7) // 8) * 8, dtype=torch.uint8)
            bits[: self.missing.numel()] = self.missing.reshape(-1).to(torch.uint8)
            weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
            missing = (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8).numpy().tobytes()
        return {
            "data": self.ids.contiguous().view(torch.uint8).numpy().tobytes(),
            "shape": list(self.ids.shape),
            "dtype": "uint8" if self.ids.dtype == torch.uint8 else "uint16",
            "start": self.start,
            "num_experts": self.num_experts,
            "missing": missing,
        }

    @classmethod
    def from_wire(cls, wire: dict) -> RoutingRecord:
        try:
            data, shape, dtype_name = wire["data"], [int(s) for s in wire["shape"]], wire["dtype"]
            start, num_experts, missing = int(wire["start"]), int(wire["num_experts"]), wire.get("missing")
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed routing wire record: {exc!r}") from exc
        dtype = {"uint8": torch.uint8, "uint16": torch.uint16}.get(dtype_name)
        if dtype is None:
            raise ValueError(f"routing wire dtype must be uint8 or uint16, got {dtype_name!r}")
        if dtype != storage_dtype(num_experts):
            raise ValueError(f"routing wire dtype {dtype_name} does not match {num_experts} experts")
        if len(shape) != 3:
            raise ValueError(f"routing wire shape must be [rows, layers, top_k], got {shape}")
        count = shape[0] * shape[1] * shape[2]
        width = 1 if dtype == torch.uint8 else 2
        if len(data) != count * width:
            raise ValueError(f"routing wire data has {len(data)} bytes, shape {shape} of {dtype_name} needs {count * width}")
        ids = torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape) if count else torch.zeros(shape, dtype=dtype)
        mask = None
        if missing is not None:
            pairs = shape[0] * shape[1]
            if len(missing) != (pairs + 7) // 8:
                raise ValueError(f"routing wire missing mask has {len(missing)} bytes, {pairs} pairs need {(pairs + 7) // 8}")
            packed = torch.frombuffer(bytearray(missing), dtype=torch.uint8).to(torch.int32)
            shifts = torch.arange(7, -1, -1, dtype=torch.int32)
            bits = ((packed.unsqueeze(1) >> shifts) & 1).reshape(-1)[:pairs]
            mask = bits.bool().reshape(shape[0], shape[1])
        record = cls(ids, mask, num_experts, start)
        dense = record.to_dense(dtype=torch.int32)
        validate_routing(dense, num_layers=shape[1], top_k=shape[2], num_experts=num_experts, what="routing wire record")
        return record

    # -- multi-turn ----------------------------------------------------------------------
    def stitch(self, turn: RoutingRecord) -> RoutingRecord:
        """Append a later turn's rows at ``turn.start``, keeping this record's rows as they are.

        Rows where both records overlap must be identical; a turn that starts before this
        record or leaves a gap after it is rejected.
        """
        if (turn.num_layers, turn.top_k, turn.num_experts) != (self.num_layers, self.top_k, self.num_experts):
            raise ValueError(
                f"cannot stitch routing of (layers, top_k, experts)={(turn.num_layers, turn.top_k, turn.num_experts)} "
                f"onto {(self.num_layers, self.top_k, self.num_experts)}"
            )
        if turn.start < self.start:
            raise ValueError(f"turn starts at row {turn.start}, before the record's first row {self.start}")
        if turn.start > self.end:
            raise ValueError(
                f"turn starts at row {turn.start} but the record ends at row {self.end}: "
                f"rows [{self.end}, {turn.start}) would have no routing (a gap between turns)"
            )
        overlap = min(self.end, turn.end) - turn.start
        if overlap > 0:
            mine = self.to_dense()[turn.start - self.start : turn.start - self.start + overlap]
            theirs = turn.to_dense()[:overlap]
            differ = (mine != theirs).any(dim=-1)
            if bool(differ.any()):
                row, layer = differ.nonzero()[0].tolist()
                raise ValueError(
                    f"turn overlaps the record at row {turn.start + row}, layer {layer} with different experts: "
                    f"{theirs[row, layer].tolist()} vs recorded {mine[row, layer].tolist()}"
                )
        if turn.end <= self.end:
            return self
        new = turn.to_dense()[max(overlap, 0) :]
        merged = torch.cat([self.to_dense(), new.to(dense_dtype(self.num_experts))], dim=0)
        return RoutingRecord.from_dense(merged, self.num_experts, start=self.start)
