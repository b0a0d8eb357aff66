"""Model-family adapters: where each Hugging Face MoE family routes, and its gate arithmetic.

Each adapter keeps its family's own arithmetic on the replayed indices, so that replaying a
model's own routing is bit-identical to native routing and the router gets a gradient
through the gates of the replayed experts (never through probabilities already zeroed
outside the trainer's own top-k).

Transformers 5.x changed two things inside the window verl 0.9.1 declares and past it:
* before 5.6.0 the softmax routers (Qwen2/3-MoE, OLMoE, Mixtral) returned softmax
  probabilities as their first output; from 5.6.0 on they return raw logits;
* before 5.13.0 DeepSeek-V3's gate returned only logits and the MoE block selected experts
  in ``route_tokens_to_experts``; from 5.13.0 on its router returns
  ``(logits, weights, indices)`` like the others.
Each is one explicit version comparison below.

Adding a family is one subclass of ``RouterFamily`` registered with ``register_family``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from verl_r3.core.replay import RouterFamily, register_family

__all__ = ["transformers_version"]

logger = logging.getLogger(__name__)

MIN_TRANSFORMERS = (5, 5, 3)
TESTED_TRANSFORMERS = ((5, 10, 4), (5, 19, 0))
_warned_untested = False


@functools.cache
def transformers_version() -> tuple[int, int, int]:
    try:
        text = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ValueError("RouterReplay needs transformers (>= 5.5.3) for Hugging Face MoE models") from exc
    parts = [int(p) for p in re.findall(r"\d+", text)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


class _HFFamily(RouterFamily):
    """Shared checks for transformers-5 MoE blocks (a ``router_attr`` module plus ``experts``)."""

    router_attr = "gate"
    experts_config_key = "num_experts"

    def check_installed(self) -> None:
        global _warned_untested
        version = transformers_version()
        if version < MIN_TRANSFORMERS:
            raise ValueError(
                f"transformers {'.'.join(map(str, version))} is not supported: MoE routers before "
                f"{'.'.join(map(str, MIN_TRANSFORMERS))} have another interface"
            )
        if version[:2] > TESTED_TRANSFORMERS[-1][:2] and not _warned_untested:
            _warned_untested = True
            logger.warning(
                "transformers %s is newer than the releases verl_r3 was tested on (%s); replay checks that every "
                "MoE layer consumed its routing and fails loudly if the router interface changed",
                ".".join(map(str, version)),
                ", ".join(".".join(map(str, v)) for v in TESTED_TRANSFORMERS),
            )

    def locate(self, decoder_layer: nn.Module):
        block = getattr(decoder_layer, "mlp", None)
        router = getattr(block, self.router_attr, None)
        experts = getattr(block, "experts", None)
        if isinstance(router, nn.Module) and isinstance(experts, nn.Module):
            return router, experts
        return None

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_config_key))


class SoftmaxTopK(_HFFamily):
    """softmax over all experts, top-k, optional renormalisation (Qwen2/3-MoE, OLMoE)."""

    model_types = ("qwen2_moe", "qwen3_moe", "olmoe")

    def gates(self, scores, idx_NK, config):
        # scores: logits (>= 5.6.0) or already-softmaxed float probabilities (< 5.6.0).
        probs = scores if transformers_version() < (5, 6, 0) else F.softmax(scores, dtype=torch.float, dim=-1)
        top = probs.gather(1, idx_NK)
        if config.norm_topk_prob:
            top = top / top.sum(dim=-1, keepdim=True)
        return top.to(scores.dtype)


class Mixtral(_HFFamily):
    """softmax over all experts in float32, top-k, always renormalised, no cast back."""

    model_types = ("mixtral",)
    experts_config_key = "num_local_experts"

    def gates(self, scores, idx_NK, config):
        probs = scores if transformers_version() < (5, 6, 0) else F.softmax(scores.float(), dim=-1)
        top = probs.gather(1, idx_NK)
        return top / top.sum(dim=-1, keepdim=True)


class GptOss(_HFFamily):
    """Router module ``router`` with a bias; softmax over the selected logits only."""

    model_types = ("gpt_oss",)
    router_attr = "router"
    experts_config_key = "num_local_experts"

    def gates(self, scores, idx_NK, config):
        top = scores.gather(1, idx_NK)
        return F.softmax(top, dim=1, dtype=top.dtype)


class DeepseekV3(_HFFamily):
    """Sigmoid scores; the correction bias and group limits act on selection only, so replay
    gathers the plain sigmoid scores, renormalises (norm_topk_prob) and scales."""

    model_types = ("deepseek_v3",)
    experts_config_key = "n_routed_experts"

    @property
    def hook(self) -> str:  # type: ignore[override]
        return "router" if transformers_version() >= (5, 13, 0) else "experts"

    def gates(self, scores, idx_NK, config):
        top = scores.sigmoid().gather(1, idx_NK)
        if config.norm_topk_prob:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return top * config.routed_scaling_factor


for _family in (SoftmaxTopK(), Mixtral(), GptOss(), DeepseekV3()):
    register_family(_family)
