"""Similarity metrics over embedding sets (DreamBench conventions: raw cosine similarities in [-1, 1]).

Averaging order, stated because papers differ: `mean_pairwise_cosine` averages over all (generated, reference)
pairs at once, i.e. the mean of the N x M cosine matrix (DreamBooth's CLIP-I / DINO: "average pairwise cosine
similarity between generated and real images"); `paired_cosine` averages row-wise pairs (image i with text i,
or the same seed before and after training).
"""

from __future__ import annotations

import torch


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over every pair: [N, D] x [M, D] -> scalar (CLIP-I, DINO)."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("mean_pairwise_cosine needs two non-empty embedding sets")
    return float((_normalize(a) @ _normalize(b).T).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i): [N, D] x [N, D] -> scalar (CLIP-T with one prompt per image; drift per seed)."""
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(
            f"paired_cosine needs two equal, non-empty sets, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return float((_normalize(a) * _normalize(b)).sum(dim=-1).mean())


def mean_self_cosine(a: torch.Tensor) -> float:
    """Mean of cos(a_i, a_j) over i != j: how alike a set is to itself (the real-vs-real CLIP-I ceiling)."""
    if len(a) < 2:
        raise ValueError("mean_self_cosine needs at least two embeddings")
    sims = _normalize(a) @ _normalize(a).T
    n = len(a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
