"""KID against its definition (brute force on tiny feature sets), its subset rules and its behaviour."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from booth.errors import BoothError
from booth.evaluate.kid import kid, mmd2_unbiased, polynomial_kernel, scale_features


def k_brute(x, y):
    d = len(x)
    return (sum(a * b for a, b in zip(x, y)) / d + 1.0) ** 3


def mmd2_brute(xs, ys):
    """The unbiased MMD² written out with loops (Bińkowski et al. 2018, eq. 3, n != m allowed)."""
    n, m = len(xs), len(ys)
    xx = sum(k_brute(xs[i], xs[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    yy = sum(k_brute(ys[i], ys[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k_brute(a, b) for a in xs for b in ys) / (n * m)
    return xx + yy - 2 * xy


def test_kernel_by_hand():
    x = torch.tensor([[1.0, 2.0]])
    y = torch.tensor([[3.0, -1.0], [0.0, 0.0]])
    # x·y = 1, d = 2: (0.5 + 1)^3 = 3.375; with zeros: 1
    assert polynomial_kernel(x, y).tolist() == [[3.375, 1.0]]


def test_mmd2_matches_the_definition_with_unequal_sizes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen)
    y = torch.randn(6, 3, generator=gen) + 0.5
    expected = mmd2_brute(x.tolist(), y.tolist())
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-10)
    # hand-checkable case: X = {a, a}, Y = {b, b} -> k(a,a) + k(b,b) - 2 k(a,b)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    value = mmd2_unbiased(torch.cat([a, a]), torch.cat([b, b]))
    assert value == pytest.approx(1.5**3 + 1.5**3 - 2 * 1.0)


def test_small_samples_use_all_features_once():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(5, 4, generator=gen), torch.randn(12, 4, generator=gen)
    result = kid(real, fake, subsets=100, subset_size=1000)
    assert result.mode == "full" and result.std is None and result.subset_size is None
    assert (result.n_real, result.n_generated) == (5, 12)
    assert result.kid == pytest.approx(mmd2_brute(real.tolist(), fake.tolist()), rel=1e-10)
    assert result.to_dict()["kid_x1000"] == pytest.approx(1000 * result.kid)


def test_subsets_follow_torch_fidelity():
    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(9, 3, generator=gen), torch.randn(7, 3, generator=gen) + 0.3
    result = kid(real, fake, subsets=5, subset_size=4, seed=11)
    rng = np.random.RandomState(11)
    values = []
    for _ in range(5):
        xi, yi = rng.choice(9, 4, replace=False), rng.choice(7, 4, replace=False)
        values.append(mmd2_brute(real[xi].tolist(), fake[yi].tolist()))
    assert result.mode == "subsets" and result.subset_size == 4 and result.subsets == 5
    assert result.kid == pytest.approx(float(np.mean(values)), rel=1e-9)
    assert result.std == pytest.approx(float(np.std(values)), rel=1e-9)


def test_zero_in_expectation_for_one_distribution_positive_when_shifted():
    gen = torch.Generator().manual_seed(3)
    same, shifted = [], []
    for _ in range(40):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 8, generator=gen)
        same.append(kid(x, y).kid)
        shifted.append(kid(x, y + 1.0).kid)
    spread = np.std(same) / math.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * spread + 1e-12  # unbiased: the mean is within noise of 0
    assert min(same) < 0 < max(same)  # and single estimates fall on both sides
    assert np.mean(shifted) > 20 * spread and min(shifted) > 0


def test_scaled_features_make_the_kernel_a_function_of_cosine():
    f = scale_features(torch.tensor([[3.0, 4.0], [10.0, 0.0]]))
    assert float(f[0] @ f[1]) / 2 == pytest.approx(0.6)  # cos = 3/5
    assert f.norm(dim=1).tolist() == pytest.approx([math.sqrt(2)] * 2)


def test_bad_input_is_a_clear_error():
    with pytest.raises(BoothError, match="at least 2 real and 2 generated"):
        kid(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(BoothError, match="one width"):
        kid(torch.zeros(3, 3), torch.zeros(3, 4))
