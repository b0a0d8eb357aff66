"""The check of ``verl-r3 stress``: every returned routing against a single-request recomputation.

Legend: N tokens of a sequence (prompt + returned tokens), L decoder layers, K experts per token.

``Reference(model_dir)`` loads the model with transformers in fp32 and, for one sequence of N
tokens, runs a forward over its first N - 1 tokens alone (no batch, no padding, no cache)
inside ``RouterReplay(model).record()``: ``[N - 1, L, K]``, row ``i`` the experts of input
position ``i``, the layout every engine returns (``verl_r3.core.record``, "Alignment").

``check_outcome`` judges one request's outcome (``verl_r3.stress.serve``) and returns a
``Verdict``. Routing is compared as expert *sets* (the K ids sorted) in the MoE layers only;
engines fill the other layers differently. A routing *differs* when its row count is not
N - 1, when it cannot be decoded, or when any (row, MoE layer) set differs. The verdict of
an aborted request says whether it was aborted cleanly (the definition is in
``verl_r3.stress``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verl_r3.stress.workload import StressRequest

__all__ = ["Reference", "Verdict", "check_outcome", "engine_routing"]


class Reference:
    """Routing of a transformers fp32 forward over one sequence at a time (see the module docstring)."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoModelForCausalLM

        from verl_r3 import RouterReplay

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                          experts_implementation="eager").eval()
        self.rr = RouterReplay(self.model)
        self.moe_layers = sorted(self.rr.moe_layers)
        config = self.model.config
        self.num_layers = config.num_hidden_layers
        self.top_k = self.rr.top_k
        self.num_experts = self.rr.num_experts

    def routing(self, ids: list[int]) -> torch.Tensor:
        """``[len(ids) - 1, L, K]`` for the sequence ``ids`` (its last token is never fed)."""
        if len(ids) < 2:
            return torch.zeros((0, self.num_layers, self.top_k), dtype=torch.long)
        with torch.no_grad(), self.rr.record() as handle:
            self.model(input_ids=torch.tensor([ids[:-1]]))
        return handle.routed_experts[0].long()


def engine_routing(routing: dict, ref: Reference, who: str) -> torch.Tensor:
    """An outcome's ``routing`` as a dense ``[rows, L, K]`` tensor; ValueError naming ``who``."""
    if routing["format"] == "dense":
        rows = torch.as_tensor(np.ascontiguousarray(routing["data"], dtype=np.int64))
        if rows.numel() == 0:
            rows = rows.reshape(0, ref.num_layers, ref.top_k)
    elif routing["format"] == "sglang":
        from verl_r3.engines.sglang_engine import routing_record

        meta = {"routed_experts": routing["data"], "prompt_tokens": routing.get("prompt_tokens"),
                "completion_tokens": routing.get("completion_tokens")}
        rows = routing_record(meta, num_layers=ref.num_layers, top_k=ref.top_k,
                              num_experts=ref.num_experts).to_dense().long()
    else:
        raise ValueError(f"{who}: unknown routing format {routing['format']!r}")
    if rows.dim() != 3 or tuple(rows.shape[1:]) != (ref.num_layers, ref.top_k):
        raise ValueError(f"{who}: routing of shape {tuple(rows.shape)}, expected [rows, {ref.num_layers}, "
                         f"{ref.top_k}]")
    return rows


@dataclass
class Verdict:
    who: str  # "request 12" or "follow-up request 64"
    status: str  # the outcome's status
    rows: int = 0  # routing rows compared (0 when none was returned or it could not be compared)
    mismatch: str | None = None  # why the routing differs from the reference
    problem: str | None = None  # anything else wrong with the outcome (failed request, unclean abort)

    @property
    def ok(self) -> bool:
        return self.mismatch is None and self.problem is None


def _compare(outcome: dict, seq: list[int], ref: Reference, who: str) -> tuple[int, str | None]:
    """(rows compared, why the routing differs or None)."""
    try:
        got = engine_routing(outcome["routing"], ref, who)
    except ValueError as exc:
        return 0, f"undecodable routing ({exc})"
    if got.shape[0] != len(seq) - 1:
        return 0, f"{got.shape[0]} routing rows for {len(seq)} tokens (prompt + returned), expected {len(seq) - 1}"
    moe = ref.moe_layers
    got = got[:, moe].sort(dim=-1).values
    want = ref.routing(seq)[:, moe].sort(dim=-1).values
    differ = (got != want).any(dim=-1)  # [N - 1, MoE layers]
    if not bool(differ.any()):
        return got.shape[0], None
    row, layer = differ.nonzero()[0].tolist()
    return got.shape[0], (f"{int(differ.sum())} of {differ.numel()} (row, MoE layer) expert sets differ from the "
                          f"single-request reference; first at row {row} (of {got.shape[0]}), layer {moe[layer]}: "
                          f"engine {got[row, layer].tolist()}, reference {want[row, layer].tolist()}")


def check_outcome(req: StressRequest, outcome: dict, ref: Reference, *, who: str | None = None) -> Verdict:
    """Judge one outcome against ``req`` and the reference (see the module docstring)."""
    who = who or f"request {req.index}"
    status, tokens, sent = outcome["status"], outcome["token_ids"], outcome["abort_sent"]
    verdict = Verdict(who, status)
    if status == "error":
        verdict.problem = f"{who} failed: {outcome['error']}"
        return verdict
    seq = list(req.prompt_ids) + list(tokens)
    if status == "completed":
        if not 1 <= len(tokens) <= req.max_tokens:
            verdict.problem = f"{who} completed with {len(tokens)} tokens, outside 1..{req.max_tokens}"
        if outcome["routing"] is None:
            verdict.mismatch = f"{who}: completed without routing"
            return verdict
    elif status == "aborted":
        if sent is None:
            verdict.problem = f"{who} ended aborted ({outcome['finish']}) although no abort was sent"
        elif len(tokens) < sent:
            verdict.problem = f"{who} was aborted after {sent} streamed tokens but returned only {len(tokens)}"
        elif len(tokens) > req.max_tokens:
            verdict.problem = f"{who} was aborted but returned {len(tokens)} tokens, over its budget {req.max_tokens}"
        if outcome["routing"] is None:
            return verdict
    verdict.rows, why = _compare(outcome, seq, ref, who)
    if why is not None:
        verdict.mismatch = f"{who} ({status}): {why}"
    return verdict
