"""Training-inference mismatch metrics for Rollout Routing Replay (R3).

Pure functions over torch tensors: they import only torch and the standard
library, never move data between devices, and return plain ``dict`` objects
of Python floats with short keys (the caller adds a prefix such as
``"mismatch/"``).

Shape legend (suffixes on names)
--------------------------------
``B``  batch (sequences)
``T``  tokens (response positions)
``L``  layers (MoE router layers)
``K``  top-k (expert slots chosen per token per layer)
``N``  flattened selected tokens (or (token, layer) pairs, as stated)
``U``  number of thresholds ``tau``
``...`` any number of leading token dimensions (e.g. ``B, T`` or ``N``)

Log-probability mismatch (``logprob_mismatch``)
-----------------------------------------------
For each response token kept by the mask, the per-token probability ratio is

    r_t = p_train(y_t) / p_rollout(y_t) = exp(log p_train - log p_rollout),

computed in float64 from the log difference (the log-probs are never
exponentiated separately, so tiny probabilities do not underflow).

``k3_kl``
    Mean over masked tokens of ``r - 1 - log r`` (Schulman's "k3" estimator).
    Tokens are sampled from the rollout policy, so this is an unbiased,
    always non-negative estimate of KL(pi_rollout || pi_train) per token;
    it is 0 exactly when the two engines agree on every token.
``extreme_frac_{tau}``
    Fraction of masked tokens whose ratio is off by more than a factor tau in
    either direction: ``max(r, 1/r) > tau``, i.e. ``|log r| > log tau``.
    The key is formatted with ``f"extreme_frac_{tau:g}"`` (1.5 ->
    ``extreme_frac_1.5``, 2.0 -> ``extreme_frac_2``). Requires tau > 1.
``tokens``
    Number of masked tokens the statistics are taken over (as a float).

``extreme_frac_curve`` returns the same fraction F(tau) for a whole 1-D
tensor of thresholds at once (for plotting F against tau).

Router disagreement (``router_disagreement``)
---------------------------------------------
Inputs are the top-K expert ids chosen by two routers (e.g. inference engine
vs. training forward) with shape ``[..., L, K]``. A row of K ``-1`` entries
means "no routing recorded for this token in this layer" (dense layers are
``-1`` everywhere). Expert choices are compared as sets: both rows are sorted
along K before comparison, so the order within K does not matter.

A (token, layer) pair is *counted* when both inputs have routing there (neither
row is all ``-1``) and the token is selected by ``token_mask`` (if given).

``router``
    Fraction of counted (token, layer) pairs whose expert sets differ.
``token``
    Among tokens with at least one counted layer, the fraction that differ in
    at least one layer.
``layers_per_token``
    Among tokens that differ in at least one counted layer, the mean number of
    differing layers (so it is >= 1 whenever any token differs; 0.0 if none).
``pairs``
    Number of counted (token, layer) pairs (as a float).
``per_layer``
    Python list of length L: per-layer fraction of counted pairs that differ,
    ``float('nan')`` for a layer with no counted pair.

If nothing is counted the fractions and ``layers_per_token`` are 0.0, ``pairs``
is 0.0 and ``per_layer`` is all nan (no error: e.g. a dense-only model).

Additive statistics (``mismatch_sums``, ``routing_sums``)
----------------------------------------------------------
Both families of figures are ratios of counts. ``mismatch_sums`` and
``routing_sums`` return those counts for one batch; counts of several batches
(micro-batches, data-parallel ranks) add up, and ``mismatch_from_sums`` /
``routing_from_sums`` turn the totals into the figures above, exactly as if
they had been computed on the whole step at once. ``logprob_mismatch`` and
``router_disagreement`` are these two steps on one batch.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch

__all__ = [
    "DEFAULT_TAUS",
    "expert_sets_differ",
    "logprob_mismatch",
    "mismatch_sums",
    "mismatch_from_sums",
    "extreme_frac_curve",
    "router_disagreement",
    "routing_sums",
    "routing_from_sums",
]

DEFAULT_TAUS = (1.5, 2.0, 5.0, 10.0)

_SIGNED_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------


def _as_bool_mask(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Return ``mask`` as a bool tensor; accepts bool or numeric 0/1 values."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 numbers, got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0/1 (or bool) values")
    return mask != 0


def _masked_log_ratio(
    rollout_log_probs: torch.Tensor,
    train_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Validate inputs and return ``log r = train - rollout`` at masked tokens.

    Returns a 1-D float64 tensor ``log_ratio_N`` (N = number of masked tokens).
    """
    for name, t in (("rollout_log_probs", rollout_log_probs), ("train_log_probs", train_log_probs)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if rollout_log_probs.shape != train_log_probs.shape:
        raise ValueError(
            "rollout_log_probs and train_log_probs must have the same shape, got "
            f"rollout_log_probs {tuple(rollout_log_probs.shape)} and "
            f"train_log_probs {tuple(train_log_probs.shape)}"
        )
    if not isinstance(response_mask, torch.Tensor):
        raise ValueError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.shape != rollout_log_probs.shape:
        raise ValueError(
            "response_mask must have the same shape as the log-probs, got "
            f"response_mask {tuple(response_mask.shape)} and log-probs "
            f"{tuple(rollout_log_probs.shape)}"
        )
    mask = _as_bool_mask(response_mask, "response_mask")
    if not allow_empty and not bool(mask.any()):
        raise ValueError("response_mask selects no token: cannot compute mismatch metrics")

    finite = torch.isfinite(rollout_log_probs) & torch.isfinite(train_log_probs)
    bad = mask & ~finite
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())  # first offending index, row-major
        where = f"(sample, position) = {idx}" if len(idx) == 2 else f"index {idx}"
        raise ValueError(
            f"non-finite log-prob at masked {where}: "
            f"rollout={float(rollout_log_probs[idx])}, train={float(train_log_probs[idx])}"
        )

    log_ratio = train_log_probs.to(torch.float64) - rollout_log_probs.to(torch.float64)
    return log_ratio[mask]


def _log_taus(taus: Union[torch.Tensor, Sequence[float]], device: torch.device) -> torch.Tensor:
    """Validate thresholds (1-D, all > 1) and return ``log(tau)`` as float64 ``[U]``."""
    taus_U = torch.as_tensor(taus, dtype=torch.float64)
    if taus_U.dim() != 1:
        raise ValueError(f"taus must be 1-D, got shape {tuple(taus_U.shape)}")
    # ``~(tau > 1)`` also rejects NaN.
    if bool((~(taus_U > 1)).any()):
        raise ValueError(f"every tau must be > 1 (a ratio threshold), got {taus_U.tolist()}")
    return taus_U.log().to(device)


def _extreme_counts(abs_log_ratio_N: torch.Tensor, log_taus_U: torch.Tensor) -> torch.Tensor:
    """Number of entries with ``|log r| > log tau`` per tau, int64 ``[U]``.

    Uses one sort plus a binary search, so memory stays O(N + U).
    """
    sorted_N = abs_log_ratio_N.sort().values
    # count of entries <= log tau; the rest are strictly greater.
    return sorted_N.numel() - torch.searchsorted(sorted_N, log_taus_U, right=True)


def _extreme_fracs(abs_log_ratio_N: torch.Tensor, log_taus_U: torch.Tensor) -> torch.Tensor:
    """F(tau) = fraction of entries with ``|log r| > log tau``, float64 ``[U]`` (0 when empty)."""
    return _extreme_counts(abs_log_ratio_N, log_taus_U).to(torch.float64) / max(abs_log_ratio_N.numel(), 1)


# --------------------------------------------------------------------------
# log-probability mismatch
# --------------------------------------------------------------------------


def logprob_mismatch(
    rollout_log_probs: torch.Tensor,
    train_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    taus: Iterable[float] = DEFAULT_TAUS,
) -> dict:
    """Per-token log-prob mismatch between the rollout and training engines.

    Args:
        rollout_log_probs: float tensor, e.g. ``[B, T]``, log p_rollout of the
            sampled tokens.
        train_log_probs: float tensor of the same shape, log p_train.
        response_mask: same shape, bool or 0/1 numbers; only masked-in tokens
            count (other positions may hold anything, including -inf/nan).
        taus: ratio thresholds, each > 1.

    Returns:
        ``{"k3_kl": float, "extreme_frac_{tau:g}": float (one per tau),
        "tokens": float}``.

    Raises:
        ValueError: shape mismatch, non-float log-probs, invalid mask, empty
            mask, non-finite log-prob at a masked position, or a tau <= 1.
    """
    _masked_log_ratio(rollout_log_probs, train_log_probs, response_mask)  # refuses an empty mask
    return mismatch_from_sums(mismatch_sums(rollout_log_probs, train_log_probs, response_mask, taus))


def mismatch_sums(
    rollout_log_probs: torch.Tensor,
    train_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    taus: Iterable[float] = DEFAULT_TAUS,
) -> dict:
    """The counts behind :func:`logprob_mismatch`, additive over batches.

    Same inputs and validation as :func:`logprob_mismatch`, except that an
    empty mask is allowed (all counts 0). Returns ``{"k3_sum": float,
    "tokens": float, "extreme_count_{tau:g}": float (one per tau)}``.
    """
    taus = [float(t) for t in taus]
    log_ratio_N = _masked_log_ratio(rollout_log_probs, train_log_probs, response_mask, allow_empty=True)
    log_taus_U = _log_taus(taus, log_ratio_N.device)
    n = log_ratio_N.numel()
    # r - 1 - log r with r = exp(log r); expm1 keeps precision for small |log r|.
    out = {"k3_sum": float((torch.expm1(log_ratio_N) - log_ratio_N).sum()), "tokens": float(n)}
    counts_U = _extreme_counts(log_ratio_N.abs(), log_taus_U).tolist()
    for tau, count in zip(taus, counts_U):
        out[f"extreme_count_{tau:g}"] = float(count)
    return out


def mismatch_from_sums(sums: dict) -> dict:
    """:func:`logprob_mismatch`'s figures from (summed) :func:`mismatch_sums` counts.

    With no token counted the fractions and k3 are nan: there is nothing to measure."""
    n = float(sums["tokens"])
    out = {"k3_kl": sums["k3_sum"] / n if n else math.nan}
    for key, value in sums.items():
        if key.startswith("extreme_count_"):
            out["extreme_frac_" + key[len("extreme_count_"):]] = value / n if n else math.nan
    out["tokens"] = n
    return out


def extreme_frac_curve(
    rollout_log_probs: torch.Tensor,
    train_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    taus: Union[torch.Tensor, Sequence[float]],
) -> torch.Tensor:
    """F(tau) = fraction of masked tokens with ``max(r, 1/r) > tau``, per tau.

    Same inputs and validation as :func:`logprob_mismatch`; ``taus`` is a 1-D
    tensor (or sequence) of thresholds, each > 1. Returns a float64 tensor of
    shape ``[U]`` on the log-probs' device, aligned with ``taus``.
    """
    log_ratio_N = _masked_log_ratio(rollout_log_probs, train_log_probs, response_mask)
    log_taus_U = _log_taus(taus, log_ratio_N.device)
    return _extreme_fracs(log_ratio_N.abs(), log_taus_U)


# --------------------------------------------------------------------------
# router disagreement
# --------------------------------------------------------------------------


def expert_sets_differ(routed_a: torch.Tensor, routed_b: torch.Tensor) -> torch.Tensor:
    """Bool ``[...]``: True where the expert sets along the last (K) axis differ, order ignored.

    No validation and no handling of ``-1`` rows: callers mask those themselves.
    """
    return (routed_a.sort(dim=-1).values != routed_b.sort(dim=-1).values).any(dim=-1)


def _check_routing(name: str, t, shape=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SIGNED_INT_DTYPES:
        raise ValueError(
            f"{name} must be a signed integer tensor (int8/int16/int32/int64; "
            f"-1 marks no routing), got dtype {t.dtype}"
        )
    if t.dim() < 2:
        raise ValueError(f"{name} must have rank >= 2 ([..., L, K]), got shape {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have the shape of routed_a {tuple(shape)}, got {tuple(t.shape)}")


def router_disagreement(
    routed_a: torch.Tensor,
    routed_b: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
) -> dict:
    """Compare two top-K routings ``[..., L, K]`` as expert sets.

    Args:
        routed_a: signed integer tensor ``[..., L, K]`` of expert ids; a row of
            K ``-1`` means no routing recorded for that (token, layer).
        routed_b: same shape (any signed integer dtype).
        token_mask: optional bool (or 0/1) tensor of shape ``[...]`` selecting
            tokens.

    Returns:
        ``{"router": float, "token": float, "layers_per_token": float,
        "pairs": float, "per_layer": list[float] (length L)}``; see the module
        docstring for definitions.

    Raises:
        ValueError: shape mismatch, non-(signed-)integer dtype, rank < 2, or a
            token_mask of the wrong shape.
    """
    figures = routing_from_sums(routing_sums(routed_a, routed_b, token_mask))
    return {key: figures[key] for key in ("router", "token", "layers_per_token", "pairs", "per_layer")}


def routing_sums(
    routed_a: torch.Tensor,
    routed_b: torch.Tensor,
    token_mask: Optional[torch.Tensor] = None,
    used: Optional[torch.Tensor] = None,
) -> dict:
    """The counts behind :func:`router_disagreement`, additive over batches.

    ``routed_a`` is the reference routing (e.g. the rollout's), ``routed_b`` the one
    compared with it (e.g. the trainer's own top-k); ``used``, optional and shaped
    like them, the experts a forward actually used (e.g. under replay), compared
    with ``routed_a`` over the same pairs. Same validation as
    :func:`router_disagreement`.

    Returns ``{"pairs_L", "differ_L"[, "differ_used_L"]}`` (float64 tensors
    ``[L]``: counted pairs, and those whose sets differ, per layer) and the floats
    ``tokens`` (tokens with a counted pair), ``tokens_differ`` (tokens with a
    differing counted pair) and ``missing`` (selected (token, layer) pairs where
    ``routed_b`` has routing and ``routed_a`` has none).
    """
    _check_routing("routed_a", routed_a)
    _check_routing("routed_b", routed_b)
    if routed_a.shape != routed_b.shape:
        raise ValueError(
            "routed_a and routed_b must have the same shape, got "
            f"routed_a {tuple(routed_a.shape)} and routed_b {tuple(routed_b.shape)}"
        )
    if used is not None:
        _check_routing("used", used, routed_a.shape)
    token_shape = routed_a.shape[:-2]
    num_layers, k = routed_a.shape[-2], routed_a.shape[-1]

    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise ValueError(f"token_mask must be a torch.Tensor, got {type(token_mask).__name__}")
        if token_mask.shape != token_shape:
            raise ValueError(
                f"token_mask must have shape {tuple(token_shape)} (routing shape without the "
                f"trailing [L, K]), got {tuple(token_mask.shape)}"
            )
        token_mask = _as_bool_mask(token_mask, "token_mask")

    # explicit N (not -1) so that empty tensors, L == 0 or K == 0 still reshape.
    num_tokens = math.prod(token_shape)
    a_NLK = routed_a.reshape(num_tokens, num_layers, k)
    b_NLK = routed_b.reshape(num_tokens, num_layers, k)

    have_a_NL = ~(a_NLK == -1).all(dim=-1)
    have_b_NL = ~(b_NLK == -1).all(dim=-1)
    selected_NL = have_b_NL if token_mask is None else have_b_NL & token_mask.reshape(-1, 1).to(have_b_NL.device)
    counted_NL = selected_NL & have_a_NL
    differ_NL = expert_sets_differ(a_NLK, b_NLK) & counted_NL

    out = {
        "pairs_L": counted_NL.sum(dim=0).to(torch.float64),
        "differ_L": differ_NL.sum(dim=0).to(torch.float64),
        "tokens": float(counted_NL.any(dim=-1).sum()),
        "tokens_differ": float(differ_NL.any(dim=-1).sum()),
        "missing": float((selected_NL & ~have_a_NL).sum()),
    }
    if used is not None:
        used_NLK = used.reshape(num_tokens, num_layers, k)
        out["differ_used_L"] = (expert_sets_differ(a_NLK, used_NLK) & counted_NL).sum(dim=0).to(torch.float64)
    return out


def routing_from_sums(sums: dict) -> dict:
    """:func:`router_disagreement`'s figures from (summed) :func:`routing_sums` counts, plus
    ``router_used`` (the ``router`` share for ``used``, when counted) and ``missing_frac``
    (missing pairs over counted plus missing ones; 0.0 when there are none)."""
    pairs_L = torch.as_tensor(sums["pairs_L"], dtype=torch.float64)
    differ_L = torch.as_tensor(sums["differ_L"], dtype=torch.float64)
    per_layer_L = torch.where(pairs_L > 0, differ_L / pairs_L.clamp(min=1), torch.full_like(pairs_L, math.nan))
    pairs = float(pairs_L.sum())
    differing = float(differ_L.sum())
    tokens, tokens_differ, missing = float(sums["tokens"]), float(sums["tokens_differ"]), float(sums["missing"])
    out = {
        "router": differing / pairs if pairs > 0 else 0.0,
        "token": tokens_differ / tokens if tokens > 0 else 0.0,
        "layers_per_token": differing / tokens_differ if tokens_differ > 0 else 0.0,
        "pairs": pairs,
        "per_layer": [float(x) for x in per_layer_L.tolist()],
        "missing_frac": missing / (pairs + missing) if pairs + missing > 0 else 0.0,
    }
    if "differ_used_L" in sums:
        used = float(torch.as_tensor(sums["differ_used_L"], dtype=torch.float64).sum())
        out["router_used"] = used / pairs if pairs > 0 else 0.0
    return out
