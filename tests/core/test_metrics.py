"""Tests for verl_r3.core.metrics (pure torch, CPU)."""

import math

import pytest
import torch

from verl_r3.core.metrics import (
    extreme_frac_curve,
    logprob_mismatch,
    mismatch_from_sums,
    mismatch_sums,
    router_disagreement,
    routing_from_sums,
    routing_sums,
)

DEFAULT_KEYS = {
    "k3_kl",
    "extreme_frac_1.5",
    "extreme_frac_2",
    "extreme_frac_5",
    "extreme_frac_10",
    "tokens",
}


# --------------------------------------------------------------------------
# logprob_mismatch / extreme_frac_curve
# --------------------------------------------------------------------------


def _t(rows, dtype=torch.float64):
    return torch.tensor(rows, dtype=dtype)


def test_k3_matches_hand_computed_value():
    rollout = [[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.2]]
    train = [[-1.2, -1.0, -0.5], [-0.3, -3.5, -9.0]]
    mask = [[1, 1, 1], [1, 1, 0]]

    terms = []
    for r_row, t_row, m_row in zip(rollout, train, mask):
        for r, t, m in zip(r_row, t_row, m_row):
            if m:
                ratio = math.exp(t) / math.exp(r)
                terms.append(ratio - 1.0 - math.log(ratio))
    expected = sum(terms) / len(terms)

    out = logprob_mismatch(_t(rollout), _t(train), torch.tensor(mask, dtype=torch.bool))
    assert set(out) == DEFAULT_KEYS
    assert out["k3_kl"] == pytest.approx(expected, rel=1e-12)
    assert out["tokens"] == 5.0
    assert isinstance(out["tokens"], float)
    # ratios: e^-0.2, e^1, 1, e^-0.2, e^-0.5; max(r, 1/r): 1.22, 2.72, 1, 1.22, 1.65
    assert out["extreme_frac_1.5"] == pytest.approx(2 / 5)
    assert out["extreme_frac_2"] == pytest.approx(1 / 5)
    assert out["extreme_frac_5"] == 0.0
    assert out["extreme_frac_10"] == 0.0


def test_float32_inputs_are_computed_in_float64():
    rollout = torch.tensor([[-0.7, -2.3]], dtype=torch.float32)
    train = torch.tensor([[-0.9, -1.1]], dtype=torch.float32)
    mask = torch.ones(1, 2, dtype=torch.bool)
    terms = []
    for r, t in zip(rollout[0].tolist(), train[0].tolist()):  # exact float32 values
        ratio = math.exp(t - r)
        terms.append(ratio - 1.0 - math.log(ratio))
    out = logprob_mismatch(rollout, train, mask)
    assert out["k3_kl"] == pytest.approx(sum(terms) / 2, rel=1e-12)


def test_ratio_from_log_difference_survives_tiny_probabilities():
    # exp(-1000) underflows to 0 even in float64; the ratio must come from the difference.
    rollout = _t([[-1000.0]])
    train = _t([[-1000.0 + math.log(3.0)]])
    out = logprob_mismatch(rollout, train, torch.ones(1, 1, dtype=torch.bool))
    assert out["k3_kl"] == pytest.approx(3.0 - 1.0 - math.log(3.0), rel=1e-9)
    assert out["extreme_frac_2"] == 1.0
    assert out["extreme_frac_5"] == 0.0


def test_identical_log_probs_give_zero():
    lp = torch.tensor([[-0.1, -5.0, -20.0], [-3.0, -0.01, -7.5]], dtype=torch.float32)
    out = logprob_mismatch(lp, lp.clone(), torch.ones(2, 3))
    assert out["k3_kl"] == 0.0
    for key in DEFAULT_KEYS - {"k3_kl", "tokens"}:
        assert out[key] == 0.0, key
    assert out["tokens"] == 6.0


@pytest.mark.parametrize("ratio", [3.0, 1.0 / 3.0])
def test_ratio_three_counts_for_small_taus_only_and_is_symmetric(ratio):
    # one extreme token among four; the others agree exactly
    rollout = _t([[-1.0, -2.0, -0.5, -0.3]])
    train = rollout.clone()
    train[0, 1] = rollout[0, 1] + math.log(ratio)
    out = logprob_mismatch(rollout, train, torch.ones(1, 4, dtype=torch.bool))
    assert out["extreme_frac_1.5"] == pytest.approx(0.25)
    assert out["extreme_frac_2"] == pytest.approx(0.25)
    assert out["extreme_frac_5"] == 0.0
    assert out["extreme_frac_10"] == 0.0
    expected_k3 = (ratio - 1.0 - math.log(ratio)) / 4
    assert out["k3_kl"] == pytest.approx(expected_k3, rel=1e-12)


def test_ratio_exactly_tau_is_not_extreme():
    # |log r| == log(tau) exactly (log-probs 0 and log 2): strict ">" means not counted.
    assert torch.tensor(2.0, dtype=torch.float64).log().item() == math.log(2.0)
    rollout = _t([[0.0, math.log(2.0), 0.0]])
    train = _t([[math.log(2.0), 0.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = logprob_mismatch(rollout, train, mask, taus=(2.0, 1.999))
    assert out["extreme_frac_2"] == 0.0
    assert out["extreme_frac_1.999"] == pytest.approx(2 / 3)
    curve = extreme_frac_curve(rollout, train, mask, [2.0, 1.999])
    assert curve.tolist() == pytest.approx([0.0, 2 / 3])


def test_custom_taus_key_format():
    lp = _t([[-1.0, -1.0]])
    out = logprob_mismatch(lp, lp, torch.ones(1, 2), taus=(1.25, 3, 100.0))
    assert set(out) == {"k3_kl", "extreme_frac_1.25", "extreme_frac_3", "extreme_frac_100", "tokens"}
    out = logprob_mismatch(lp, lp, torch.ones(1, 2), taus=())
    assert set(out) == {"k3_kl", "tokens"}


def test_masked_out_tokens_are_ignored_even_if_extreme_or_non_finite():
    rollout = _t([[-1.0, -1.0, float("-inf"), -1.0], [-2.0, float("nan"), -0.5, -1.0]])
    train = _t([[-1.0, -50.0, -1.0, float("-inf")], [-2.0, -1.0, -0.5, float("inf")]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    out = logprob_mismatch(rollout, train, mask)
    assert out["k3_kl"] == 0.0
    assert out["extreme_frac_1.5"] == 0.0
    assert out["tokens"] == 3.0


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_mask_dtypes_are_equivalent(dtype):
    rollout = _t([[-1.0, -2.0, -3.0]])
    train = _t([[-1.0, -2.0 + math.log(4.0), -100.0]])
    mask = torch.tensor([[1, 1, 0]]).to(dtype)
    out = logprob_mismatch(rollout, train, mask)
    assert out["tokens"] == 2.0
    assert out["extreme_frac_2"] == pytest.approx(0.5)
    assert out["k3_kl"] == pytest.approx((4.0 - 1.0 - math.log(4.0)) / 2, rel=1e-12)


def test_one_dimensional_and_three_dimensional_inputs():
    r1 = _t([-1.0, -1.0 + math.log(6.0)])
    t1 = _t([-1.0, -1.0])
    out1 = logprob_mismatch(r1, t1, torch.ones(2, dtype=torch.bool))
    assert out1["extreme_frac_5"] == pytest.approx(0.5)
    out3 = logprob_mismatch(r1.view(1, 1, 2), t1.view(1, 1, 2), torch.ones(1, 1, 2))
    assert out3 == out1


def test_logprob_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="response_mask"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4))


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="no token"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["rollout", "train"])
def test_non_finite_at_masked_position_names_first_index(bad, which):
    rollout = torch.full((3, 4), -1.0)
    train = torch.full((3, 4), -1.0)
    target = rollout if which == "rollout" else train
    target[2, 0] = bad  # later offender
    target[1, 3] = bad  # first offender in row-major order
    target[0, 1] = bad  # masked out: must not be reported
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1] = False
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 3\)"):
        logprob_mismatch(rollout, train, mask)
    with pytest.raises(ValueError, match=r"non-finite.*\(1, 3\)"):
        extreme_frac_curve(rollout, train, mask, torch.tensor([2.0]))


@pytest.mark.parametrize("tau", [1.0, 0.5, -2.0, float("nan")])
def test_tau_not_above_one_raises(tau):
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="tau"):
        logprob_mismatch(lp, lp, torch.ones(1, 2), taus=(2.0, tau))
    with pytest.raises(ValueError, match="tau"):
        extreme_frac_curve(lp, lp, torch.ones(1, 2), torch.tensor([2.0, tau]))


def test_integer_log_probs_raise():
    with pytest.raises(ValueError, match="floating-point"):
        logprob_mismatch(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2), torch.ones(1, 2))


def test_non_binary_mask_raises():
    with pytest.raises(ValueError, match="0/1"):
        logprob_mismatch(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[1.0, 0.5]]))


def test_extreme_frac_curve_matches_brute_force_and_mismatch():
    gen = torch.Generator().manual_seed(0)
    rollout = -torch.rand(4, 16, generator=gen, dtype=torch.float64) * 5
    train = rollout + torch.randn(4, 16, generator=gen, dtype=torch.float64) * 1.5
    mask = torch.rand(4, 16, generator=gen) > 0.3
    taus = torch.tensor([1.01, 1.5, 2.0, 3.0, 5.0, 10.0, 1e6])

    curve = extreme_frac_curve(rollout, train, mask, taus)
    assert curve.shape == (7,)
    assert curve.dtype == torch.float64

    ratios = [math.exp(t - r) for r, t, m in zip(rollout.flatten().tolist(), train.flatten().tolist(), mask.flatten().tolist()) if m]
    for i, tau in enumerate(taus.tolist()):
        expected = sum(max(x, 1 / x) > tau for x in ratios) / len(ratios)
        assert curve[i].item() == pytest.approx(expected), tau
    assert curve[0] > curve[3] > 0  # non-trivial, decreasing
    assert curve[-1] == 0.0

    out = logprob_mismatch(rollout, train, mask, taus=(1.5, 2.0, 5.0))
    assert out["extreme_frac_1.5"] == pytest.approx(curve[1].item())
    assert out["extreme_frac_2"] == pytest.approx(curve[2].item())
    assert out["extreme_frac_5"] == pytest.approx(curve[4].item())


def test_extreme_frac_curve_rejects_non_1d_taus():
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="1-D"):
        extreme_frac_curve(lp, lp, torch.ones(1, 2), torch.tensor([[2.0]]))


# --------------------------------------------------------------------------
# router_disagreement
# --------------------------------------------------------------------------


def _routing(B=2, T=3, L=4, K=2, E=8, dtype=torch.int64):
    """Deterministic routing with K distinct experts per (token, layer)."""
    b = torch.arange(B).view(B, 1, 1, 1)
    t = torch.arange(T).view(1, T, 1, 1)
    l = torch.arange(L).view(1, 1, L, 1)
    k = torch.arange(K).view(1, 1, 1, K)
    return ((b * 3 + t * 5 + l * 7 + k) % E).to(dtype)


def test_permuted_order_within_k_counts_as_agreement():
    a = _routing(K=3)
    b = a.flip(-1).clone()
    b[0, 1, 2] = b[0, 1, 2, [1, 2, 0]]
    assert not torch.equal(a, b)
    out = router_disagreement(a, b)
    assert out["router"] == 0.0
    assert out["token"] == 0.0
    assert out["layers_per_token"] == 0.0
    assert out["pairs"] == 2 * 3 * 4
    assert out["per_layer"] == [0.0] * 4


def test_one_differing_layer_in_one_token_exact_values():
    a = _routing(B=2, T=3, L=4, K=2, E=8)
    b = a.clone()
    b[1, 2, 3, 0] = (a[1, 2, 3, 0] + 4) % 8  # a different expert, still distinct from slot 1
    assert set(b[1, 2, 3].tolist()) != set(a[1, 2, 3].tolist())

    out = router_disagreement(a, b)
    assert set(out) == {"router", "token", "layers_per_token", "pairs", "per_layer"}
    assert out["pairs"] == 24.0
    assert out["router"] == pytest.approx(1 / 24)
    assert out["token"] == pytest.approx(1 / 6)
    assert out["layers_per_token"] == 1.0
    assert out["per_layer"] == pytest.approx([0.0, 0.0, 0.0, 1 / 6])
    assert all(isinstance(v, float) for k, v in out.items() if k != "per_layer")
    assert isinstance(out["per_layer"], list)


def test_layers_per_token_averages_over_differing_tokens():
    a = _routing(B=1, T=4, L=3, K=2, E=8)
    b = a.clone()
    b[0, 0, 0] = a[0, 0, 0] + 100  # token 0: layers 0 and 2 differ
    b[0, 0, 2] = a[0, 0, 2] + 100
    b[0, 3, 1, 1] = 99  # token 3: layer 1 differs
    out = router_disagreement(a, b)
    assert out["pairs"] == 12.0
    assert out["router"] == pytest.approx(3 / 12)
    assert out["token"] == pytest.approx(2 / 4)
    assert out["layers_per_token"] == pytest.approx(3 / 2)
    assert out["per_layer"] == pytest.approx([1 / 4, 1 / 4, 1 / 4])


def test_rows_of_minus_one_are_excluded():
    a = _routing(B=1, T=4, L=3, K=2, E=8)
    a[..., 1, :] = -1  # layer 1 is dense in both
    b = a.clone()
    b[0, 0, 0, :] = -1  # only b lacks routing here: excluded although the rows differ
    a[0, 1, 2, :] = -1  # only a lacks routing here: excluded
    b[0, 2, 2] = a[0, 2, 2] + 50  # the one counted disagreement
    out = router_disagreement(a, b)
    # counted pairs: layer 0 -> tokens 1,2,3 ; layer 2 -> tokens 0,2,3
    assert out["pairs"] == 6.0
    assert out["router"] == pytest.approx(1 / 6)
    assert out["token"] == pytest.approx(1 / 4)  # all 4 tokens have a counted layer
    assert out["layers_per_token"] == 1.0
    assert out["per_layer"][0] == 0.0
    assert math.isnan(out["per_layer"][1])
    assert out["per_layer"][2] == pytest.approx(1 / 3)


def test_token_mask_excludes_tokens():
    a = _routing(B=2, T=3, L=2, K=2)
    b = a.clone()
    b[0, 0, 1] = a[0, 0, 1] + 10  # differs, but masked out
    b[1, 1, 0] = a[1, 1, 0] + 10  # differs, kept
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, 2] = False
    out = router_disagreement(a, b, token_mask=mask)
    assert out["pairs"] == 8.0
    assert out["router"] == pytest.approx(1 / 8)
    assert out["token"] == pytest.approx(1 / 4)
    assert out["per_layer"] == pytest.approx([1 / 4, 0.0])

    unmasked = router_disagreement(a, b)
    assert unmasked["pairs"] == 12.0
    assert unmasked["router"] == pytest.approx(2 / 12)


@pytest.mark.parametrize("dtype_a,dtype_b", [(torch.int16, torch.int16), (torch.int64, torch.int64), (torch.int16, torch.int64), (torch.int32, torch.int8)])
def test_integer_dtypes_accepted(dtype_a, dtype_b):
    a = _routing(B=1, T=2, L=2, K=2)
    b = a.clone()
    b[0, 1, 1] = torch.tensor([6, 7])
    assert set(b[0, 1, 1].tolist()) != set(a[0, 1, 1].tolist())
    out = router_disagreement(a.to(dtype_a), b.to(dtype_b))
    assert out["pairs"] == 4.0
    assert out["router"] == pytest.approx(1 / 4)
    assert out["per_layer"] == pytest.approx([0.0, 1 / 2])


def test_flat_token_layout_matches_batched_layout():
    a = _routing(B=2, T=3, L=4, K=2)
    b = a.clone()
    b[0, 2, 1, 1] = 99
    b[1, 0, 3, 0] = 98
    mask = torch.tensor([[1, 1, 1], [1, 0, 1]], dtype=torch.bool)
    batched = router_disagreement(a, b, mask)
    flat = router_disagreement(a.reshape(6, 4, 2), b.reshape(6, 4, 2), mask.reshape(6))
    assert batched == flat
    assert batched["router"] == pytest.approx(2 / 20)


def test_single_token_rank_two_input():
    a = torch.tensor([[1, 2], [-1, -1], [3, 4]])
    b = torch.tensor([[2, 1], [-1, -1], [3, 5]])
    out = router_disagreement(a, b)
    assert out["pairs"] == 2.0
    assert out["router"] == 0.5
    assert out["token"] == 1.0
    assert out["per_layer"][0] == 0.0 and math.isnan(out["per_layer"][1]) and out["per_layer"][2] == 1.0


def test_nothing_counted_returns_zeros_and_nan():
    a = torch.full((2, 3, 2, 4), -1, dtype=torch.int32)
    out = router_disagreement(a, a.clone())
    assert out["router"] == 0.0
    assert out["token"] == 0.0
    assert out["layers_per_token"] == 0.0
    assert out["pairs"] == 0.0
    assert len(out["per_layer"]) == 2 and all(math.isnan(x) for x in out["per_layer"])

    b = _routing(B=2, T=3, L=2, K=4)
    out = router_disagreement(b, b + 1, token_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert out["pairs"] == 0.0 and out["router"] == 0.0
    assert all(math.isnan(x) for x in out["per_layer"])


def test_router_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3, 4, 2\).*\(2, 3, 4, 3\)"):
        router_disagreement(torch.zeros(2, 3, 4, 2, dtype=torch.long), torch.zeros(2, 3, 4, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_router_non_integer_dtype_raises(dtype):
    good = torch.zeros(2, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="integer"):
        router_disagreement(good.to(dtype), good)
    with pytest.raises(ValueError, match="integer"):
        router_disagreement(good, good.to(dtype))


def test_router_rank_below_two_raises():
    with pytest.raises(ValueError, match="rank"):
        router_disagreement(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))


def test_router_token_mask_shape_mismatch_raises():
    a = torch.zeros(2, 3, 4, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_mask.*\(2, 3\)"):
        router_disagreement(a, a, token_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask"):
        router_disagreement(a, a, token_mask=torch.ones(2, 3, 4, dtype=torch.bool))


# --------------------------------------------------------------------------
# additive statistics
# --------------------------------------------------------------------------


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def test_mismatch_sums_of_two_batches_give_the_figures_of_both_at_once():
    g = torch.Generator().manual_seed(3)
    rollout = -torch.rand(2, 9, generator=g) * 4
    train = rollout + torch.randn(2, 9, generator=g) * 0.8
    mask = torch.rand(2, 9, generator=g) > 0.3
    whole = logprob_mismatch(rollout, train, mask)
    halves = _add(mismatch_sums(rollout[:1], train[:1], mask[:1]), mismatch_sums(rollout[1:], train[1:], mask[1:]))
    assert mismatch_from_sums(halves) == pytest.approx(whole)
    assert halves["tokens"] == float(mask.sum())


def test_known_ratio_gives_known_counts_and_empty_mask_counts_nothing():
    rollout = torch.zeros(4)
    train = torch.tensor([0.0, math.log(3.0), -math.log(3.0), math.log(1.2)])
    sums = mismatch_sums(rollout, train, torch.ones(4, dtype=torch.bool))
    assert sums["extreme_count_1.5"] == 2.0 and sums["extreme_count_2"] == 2.0 and sums["extreme_count_5"] == 0.0
    assert sums["k3_sum"] == pytest.approx((3 - 1 - math.log(3)) + (1 / 3 - 1 + math.log(3)) + (1.2 - 1 - math.log(1.2)))
    empty = mismatch_sums(rollout, train, torch.zeros(4, dtype=torch.bool))
    assert empty["tokens"] == 0.0 and empty["k3_sum"] == 0.0 and empty["extreme_count_2"] == 0.0
    figures = mismatch_from_sums(empty)
    assert math.isnan(figures["k3_kl"]) and math.isnan(figures["extreme_frac_2"])


def test_routing_sums_add_up_and_count_used_and_missing_pairs():
    g = torch.Generator().manual_seed(4)
    a = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10 * 3)]).view(10, 3, 2)
    b = a.clone()
    b[2, 1] = torch.tensor([5, 4]) if set(a[2, 1].tolist()) != {4, 5} else torch.tensor([0, 1])
    b[7, 0] = torch.tensor([5, 4]) if set(a[7, 0].tolist()) != {4, 5} else torch.tensor([0, 1])
    a[9, 2] = -1  # no rollout routing for one pair: missing, not counted
    whole = router_disagreement(a, b)
    sums = _add(routing_sums(a[:5], b[:5], used=a[:5]), routing_sums(a[5:], b[5:], used=a[5:]))
    figures = routing_from_sums(sums)
    assert figures["per_layer"] == whole.pop("per_layer") == [0.1, 0.1, 0.0]
    assert {k: figures[k] for k in whole} == pytest.approx(whole)
    assert figures["router"] == 2 / 29 and figures["router_used"] == 0.0
    assert sums["missing"] == 1.0 and figures["missing_frac"] == 1 / 30
    assert figures["token"] == 2 / 10 and figures["layers_per_token"] == 1.0
