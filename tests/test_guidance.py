"""Guidance math against hand-computed values."""

import torch

from booth.generate import guidance


def test_composable_cfg_reduces_to_cfg_and_sums_weighted_deltas():
    u, c1, c2 = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2), torch.full((1, 1, 1, 2), 3.0)
    assert torch.allclose(guidance.composable_cfg(u, [c1], [1.0], 7.0), torch.full_like(u, 7.0))
    # u + 0.5*2*(1-0) + 1*2*(3-0) = 1 + 6
    assert torch.allclose(guidance.composable_cfg(u, [c1, c2], [0.5, 1.0], 2.0), torch.full_like(u, 7.0))


def test_composable_cfg_with_a_negative_per_term_guides_each_term_against_its_own():
    u1, u2 = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    c1, c2 = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 4.0)
    # one term: plain guidance against its own negative
    assert torch.allclose(guidance.composable_cfg([u2], [c2], [1.0], 3.0), u2 + 3.0 * (c2 - u2))
    # equal negatives: the one-negative formula
    same = guidance.composable_cfg([u1, u1], [c1, c2], [0.5, 1.0], 2.0)
    assert torch.allclose(same, guidance.composable_cfg(u1, [c1, c2], [0.5, 1.0], 2.0), atol=1e-5)
    # two: base is the |w|-weighted mean of the negatives, each delta against its own (1/3*0 + 2/3*2 = 4/3)
    out = guidance.composable_cfg([u1, u2], [c1, c2], [1.0, 2.0], 1.0)
    assert torch.allclose(out, torch.full_like(u1, 4 / 3 + 1.0 * 1 + 2.0 * 2), atol=1e-4)
    # per-pixel weights (Latent Couple): each half is its own term's guidance
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).expand(1, 1, 2, 2)
    halves = guidance.composable_cfg([u1, u2], [c1, c2], [left, 1 - left], 5.0)
    assert torch.allclose(halves[..., 0], (u1 + 5 * (c1 - u1))[..., 0], atol=1e-4)
    assert torch.allclose(halves[..., 1], (u2 + 5 * (c2 - u2))[..., 1], atol=1e-4)


def test_rescale_noise_cfg_matches_lin_et_al_equations():
    x_pos = torch.tensor([[[[1.0, -1.0, 1.0, -1.0]]]])  # std (unbiased) = 1.1547
    x_cfg = 3 * x_pos
    out = guidance.rescale_noise_cfg(x_cfg, x_pos, phi=1.0)
    assert torch.allclose(out, x_pos)  # fully rescaled to the positive prediction's std
    half = guidance.rescale_noise_cfg(x_cfg, x_pos, phi=0.5)
    assert torch.allclose(half, 0.5 * x_pos + 0.5 * x_cfg)


def test_dynamic_threshold_is_the_percentile_rule_without_upper_clamp():
    x0 = torch.tensor([[[[0.5, -1.0, 2.0, -4.0]]]])
    # p = 1.0 -> s = max |x0| = 4 > 1: clip to [-4, 4] then divide by 4
    out = guidance.dynamic_threshold(x0, p=1.0, c=1.0)
    assert torch.allclose(out, x0 / 4)
    # s below the static range c: plain clip to [-c, c] (c = 5 -> unchanged)
    assert torch.allclose(guidance.dynamic_threshold(x0, p=1.0, c=5.0), x0)
    # per sample: the second sample has its own s
    batch = torch.cat([x0, x0 * 0.5])
    out = guidance.dynamic_threshold(batch, p=1.0, c=1.0)
    assert torch.allclose(out[1], (x0 * 0.5 / 2)[0])


def test_prediction_x0_round_trip_eps_and_v():
    torch.manual_seed(0)
    x_t, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ab = torch.tensor(0.3)
    for kind in ("epsilon", "v_prediction"):
        x0 = guidance.prediction_to_x0(pred, x_t, ab, kind)
        assert torch.allclose(guidance.x0_to_prediction(x0, x_t, ab, kind), pred, atol=1e-5)
    # epsilon: x_t = sqrt(ab) x0 + sqrt(1-ab) eps
    x0 = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    assert torch.allclose(guidance.prediction_to_x0(eps, xt, ab, "epsilon"), x0, atol=1e-5)
