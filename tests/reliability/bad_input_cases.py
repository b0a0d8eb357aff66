"""The bad-input matrix: each case is one defect of a batch's routing, and what it must end in
through the public API and through verl's FSDP engine (``test_bad_input.py``).

A defect works on per-sample engine rows (``[n - 1, L, K]`` int16, -1 = missing, the contract
of ``verl_r3.core.record``) and always damages sample 1, so every error must name "sample 1".
The model is verl_r3's tiny Qwen3-MoE: 3 layers (layer 1 dense), 8 experts, top-2.

Outcomes: ``Error(regex)`` (a ``ValueError`` whose message matches, raised before anything is
replayed), ``Fallback()`` (the per-token fallback: rows without routing run natively and are
counted; in verl also logged with the sample named) or ``Problem(regex)`` (the step's replay
check, ``verl_r3.integration.step_metrics.replay_problems``, reports it).

Pure torch: imported by the test and by the verl subprocess it starts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SAMPLE = 1  # the damaged sample
ROW = 2  # the damaged row of that sample (a prompt row: every sample has a prompt of >= 3 tokens)


@dataclass(frozen=True)
class Error:
    pattern: str


@dataclass(frozen=True)
class Fallback:
    pass


@dataclass(frozen=True)
class Problem:
    pattern: str


@dataclass(frozen=True)
class Case:
    defect: Callable[[list[torch.Tensor], int], list[torch.Tensor]]
    public: Error | Fallback
    verl: Error | Fallback | Problem
    #: How the public API takes the routing: "replay" (``rr.replay`` of the batch) or "records"
    #: (per-sample ``RoutingRecord`` placed into the batch by ``formats.to_verl_batch``).
    public_via: str = "replay"
    #: False where the defect is the whole batch's shape (every sample's layer or top-k count).
    names_sample: bool = True


def _at(rows: list[torch.Tensor], value, *, layer: int = 0) -> list[torch.Tensor]:
    rows = [r.clone() for r in rows]
    rows[SAMPLE][ROW, layer] = torch.as_tensor(value, dtype=rows[SAMPLE].dtype)
    return rows


def _each(rows: list[torch.Tensor], change) -> list[torch.Tensor]:
    return [change(r.clone()) for r in rows]


def _only_sample(rows: list[torch.Tensor], change) -> list[torch.Tensor]:
    return [change(r.clone()) if i == SAMPLE else r.clone() for i, r in enumerate(rows)]


def _other_expert(r: torch.Tensor, experts: int) -> torch.Tensor:
    """One more id per row, distinct from the row's own ids."""
    extra = (r.max(dim=-1, keepdim=True).values + 1) % experts
    clash = (r == extra).any(dim=-1, keepdim=True)
    return torch.where(clash, (extra + 1) % experts, extra)


CASES: dict[str, Case] = {
    "routing missing for some samples": Case(
        lambda rows, e: _only_sample(rows, lambda r: r.fill_(-1)), Fallback(), Fallback()),
    "routing missing for all samples": Case(
        lambda rows, e: _each(rows, lambda r: r.fill_(-1)), Fallback(),
        Problem(r"all \d+ \(response token, MoE layer\) pairs fell back")),
    "wrong number of layers (routing from a deeper model)": Case(
        lambda rows, e: _each(rows, lambda r: torch.cat([r, r[:, :1]], dim=1)),
        Error("4 layers but the model has num_hidden_layers=3"), Error("4 layers but the model has num_hidden_layers=3"),
        names_sample=False),
    "wrong top-k": Case(
        lambda rows, e: _each(rows, lambda r: torch.cat([r, _other_expert(r, e)], dim=-1)),
        Error("top_k 3 but the model routes each token to 2 experts"),
        Error("top_k 3 but the model routes each token to 2 experts"), names_sample=False),
    "id out of range": Case(
        lambda rows, e: _at(rows, [e, 1]), Error(rf"sample 1, row {ROW}, layer 0: expert id >= num_experts=8"),
        Error(rf"sample 1, row {ROW}, layer 0: expert id >= num_experts=8")),
    "routing from a model with more experts": Case(
        lambda rows, e: _at(rows, [200, 1], layer=2), Error(rf"sample 1, row {ROW}, layer 2: expert id >= num_experts=8"),
        Error(rf"sample 1, row {ROW}, layer 2: expert id >= num_experts=8")),
    "negative id other than the missing marker": Case(
        lambda rows, e: _at(rows, [-3, 1]), Error(rf"sample 1, row {ROW}, layer 0: negative id other than"),
        Error(rf"sample 1, row {ROW}, layer 0: negative id other than")),
    "duplicate ids in a row": Case(
        lambda rows, e: _at(rows, [5, 5]), Error(rf"sample 1, row {ROW}, layer 0: duplicate expert ids"),
        Error(rf"sample 1, row {ROW}, layer 0: duplicate expert ids")),
    # verl zero-fills rows an engine did not return: in its layout a row of zeros is missing routing.
    "a row of zeros (verl's fill)": Case(
        lambda rows, e: _at(rows, [0, 0]), Error(rf"sample 1, row {ROW}, layer 0: duplicate expert ids"), Fallback()),
    "row partly missing": Case(
        lambda rows, e: _at(rows, [3, -1]), Error(rf"sample 1, row {ROW}, layer 0: row partly -1"),
        Error(rf"sample 1, row {ROW}, layer 0: row partly -1")),
    "routing longer than the sequence (response truncated after generation)": Case(
        lambda rows, e: _only_sample(rows, lambda r: torch.cat([r, r[:2]])),
        Error(r"sample 1: routing covers positions \[0, \d+\) but the sequence has \d+ tokens"),
        Error(r"sample 1 has \d+ routing rows for \d+ tokens"), public_via="records"),
    # In verl's layout short routing is zero-filled to the sequence: its tail falls back.
    "routing shorter than the sequence": Case(
        lambda rows, e: _only_sample(rows, lambda r: r[: r.shape[0] - 3]),
        Error(r"sample 1: routing covers positions \[0, \d+\) but the sequence has \d+ tokens"), Fallback(),
        public_via="records"),
}


def missing_pairs(rows: list[torch.Tensor], moe_layers, lengths: list[int] | None = None) -> list[torch.Tensor]:
    """Per sample, bool ``[rows, MoE layers]``: pairs without routing (-1 everywhere, or zeros with
    K >= 2, verl's fill). With ``lengths`` (rows an engine returns for each sample's tokens), rows
    short of it count as missing (verl zero-fills them) and rows past it are dropped."""
    out = []
    for i, r in enumerate(rows):
        layers = r[:, sorted(moe_layers)]
        missing = (layers == -1).all(-1)
        if r.shape[-1] >= 2:
            missing |= (layers == 0).all(-1)
        if lengths is not None:
            n = lengths[i]
            missing = torch.cat([missing[:n], torch.ones(max(0, n - missing.shape[0]), missing.shape[1], dtype=torch.bool)])
        out.append(missing)
    return out
