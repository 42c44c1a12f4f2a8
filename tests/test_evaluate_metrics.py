"""Similarity metrics against hand-computed values."""

import math

import pytest
import torch

from booth.evaluate.metrics import mean_pairwise_cosine, mean_self_cosine, paired_cosine


def test_mean_pairwise_cosine_averages_all_pairs():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos: (a0,b0)=1, (a0,b1)=1/sqrt2, (a1,b0)=0, (a1,b1)=1/sqrt2
    assert mean_pairwise_cosine(a, b) == pytest.approx((1 + 2 / math.sqrt(2)) / 4)


def test_paired_cosine_averages_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, -5.0]])
    assert paired_cosine(a, b) == pytest.approx((1 / math.sqrt(2) - 1) / 2)
    with pytest.raises(ValueError):
        paired_cosine(a, b[:1])


def test_self_cosine_leaves_out_the_diagonal():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # pairs i != j: (0,1)=0 (0,2)=1 (1,2)=0, each twice -> 1/3
    assert mean_self_cosine(a) == pytest.approx(1 / 3)
