"""Kernel Inception Distance (Bińkowski et al. 2018) on any image features, with small-sample rules.

KID is the unbiased estimate of the squared maximum mean discrepancy (MMD²) between the feature distributions
of real images X (n) and generated images Y (m), with the cubic polynomial kernel

    k(x, y) = (x·y / d + 1)^3                    (d = feature dimension; torchmetrics / torch-fidelity defaults)

    MMD²_u = 1/(n(n-1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m-1)) Σ_{i≠j} k(y_i, y_j) - 2/(nm) Σ_{i,j} k(x_i, y_j)

It is unbiased, so it can be slightly negative, and its expectation is 0 when both sets come from the same
distribution. It is usually reported × 10³.

Subsets (torch-fidelity's procedure, `kid_subsets` 100, `kid_subset_size` 1000, rng seed 2020): when both sets
hold at least `subset_size` samples, `subsets` times draw `subset_size` real and `subset_size` generated
samples without replacement (independently), compute MMD²_u, and report the mean and the population std over
subsets. **Small samples** (fewer than `subset_size` in either set, e.g. DreamBench's 4-6 real images;
torchmetrics and torch-fidelity raise there): one MMD²_u over all n real and all m generated samples (the
estimator above allows n ≠ m), std None, ``mode: "full"``. Both sets need at least 2 samples.

Features: the standard is Inception-v3 pool3 (2048-d), which needs torchvision / the TF-Inception weights;
booth does not depend on them, so `booth eval dreambench` computes KID on CLIP (default) or DINO image features
and records which. Features are L2-normalised and scaled to norm √d (`scale_features`), so x·y/d is the cosine
and k(x, y) = (cos + 1)^3 whatever the backbone's feature norms: KID values are comparable between runs with
the same backbone, not with Inception-based KID tables.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from booth.errors import BoothError

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
DEFAULT_SEED = 2020


def polynomial_kernel(
    x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None, coef: float = 1.0
) -> torch.Tensor:
    """[n, d] x [m, d] -> [n, m] matrix of (gamma x·y + coef)^degree, gamma = 1/d by default."""
    x, y = x.double(), y.double()
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * (x @ y.T) + coef) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, **kernel: Any) -> float:
    """The unbiased MMD² of the module docstring (n, m >= 2; n != m allowed)."""
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise BoothError(f"KID needs at least 2 real and 2 generated samples, got {n} and {m}")
    kxx, kyy, kxy = (
        polynomial_kernel(x, x, **kernel),
        polynomial_kernel(y, y, **kernel),
        polynomial_kernel(x, y, **kernel),
    )
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def scale_features(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise and scale to norm √d, so the kernel's x·y/d is the cosine similarity."""
    f = torch.nn.functional.normalize(features.double(), dim=-1)
    return f * math.sqrt(f.shape[-1])


@dataclass
class KIDResult:
    """KID with everything needed to read it: mean (and × 10³), std over subsets (None in full mode)."""

    kid: float
    std: float | None
    mode: str  # "subsets" | "full"
    subset_size: int | None
    subsets: int
    n_real: int
    n_generated: int
    kernel: str = "(x·y/d + 1)^3"
    features: str = ""

    @property
    def kid_x1000(self) -> float:
        return self.kid * 1000

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kid_x1000": self.kid_x1000}


def kid(
    real: torch.Tensor,
    generated: torch.Tensor,
    subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = DEFAULT_SEED,
    features: str = "",
    **kernel: Any,
) -> KIDResult:
    """KID of `generated` against `real` features ([n, d], [m, d]) with the subset rules of the module docstring.

    Features are used as given: call `scale_features` first for booth's convention."""
    n, m = len(real), len(generated)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise BoothError(
            f"KID needs two [N, D] feature sets of one width, got {tuple(real.shape)} and {tuple(generated.shape)}"
        )
    if n < 2 or m < 2:
        raise BoothError(f"KID needs at least 2 real and 2 generated images, got {n} and {m}")
    if subsets < 1 or subset_size < 2:
        raise BoothError(f"KID needs subsets >= 1 and subset size >= 2, got {subsets} and {subset_size}")
    if min(n, m) < subset_size:
        value = mmd2_unbiased(real, generated, **kernel)
        return KIDResult(value, None, "full", None, 1, n, m, features=features)
    rng = np.random.RandomState(seed)
    values = []
    for _ in range(subsets):
        x = real[torch.from_numpy(rng.choice(n, subset_size, replace=False))]
        y = generated[torch.from_numpy(rng.choice(m, subset_size, replace=False))]
        values.append(mmd2_unbiased(x, y, **kernel))
    return KIDResult(
        float(np.mean(values)),
        float(np.std(values)),
        "subsets",
        subset_size,
        subsets,
        n,
        m,
        features=features,
    )


__all__ = ["KIDResult", "kid", "mmd2_unbiased", "polynomial_kernel", "scale_features"]
