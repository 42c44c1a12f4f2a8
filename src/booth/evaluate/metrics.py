"""Similarity metrics over embedding sets (DreamBench conventions: raw cosine similarities in [-1, 1]).

Averaging order, stated because papers differ: `mean_pairwise_cosine` averages over all (generated, reference)
pairs at once, i.e. the mean of the N x M cosine matrix (DreamBooth's CLIP-I / DINO: "average pairwise cosine
similarity between generated and real images"); `paired_cosine` averages row-wise pairs (image i with text i,
or the same seed before and after training).

PRES is `mean_pairwise_cosine` of class-prompt images and the real subject images (DINO); DIV averages
per prompt first (mean pairwise cosine distance among that prompt's images), then over prompts.
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


def pres(class_images: torch.Tensor, references: torch.Tensor) -> float:
    """PRES (DreamBooth Table 3, lower is better): mean DINO cosine over all (class-prompt image, real subject
    image) pairs, where the class-prompt images come from the personalized model prompted with the class noun
    only ("a dog in the snow", no identifier). High = random members of the class look like the subject (prior
    collapse). The same average as `mean_pairwise_cosine`."""
    return mean_pairwise_cosine(class_images, references)


def div(groups: list[torch.Tensor]) -> float:
    """DIV (DreamBooth Table 3, higher is better): diversity among images of the same prompt.

    For each group (the images of one prompt, [k, D] features), the mean cosine distance 1 - cos(a_i, a_j) over
    the k(k-1)/2 pairs i < j; then the mean over groups (each prompt weighs the same). Groups of fewer than two
    images are skipped. The paper measures LPIPS distance; LPIPS needs torchvision's VGG/AlexNet weights, which
    booth does not use, so booth's DIV is this feature-space distance (DINO features in `booth eval dreambench`)
    and is not on the paper's LPIPS scale.
    """
    per_group = []
    for g in groups:
        if len(g) < 2:
            continue
        sims = _normalize(g) @ _normalize(g).T
        k = len(g)
        mean_sim = (sims.sum() - sims.diagonal().sum()) / (k * (k - 1))
        per_group.append(1.0 - float(mean_sim))
    if not per_group:
        raise ValueError("div needs at least one group of two or more images")
    return sum(per_group) / len(per_group)


def clip_score(images: torch.Tensor, texts: torch.Tensor, w: float = 2.5) -> float:
    """Hessel et al. CLIPScore (Custom Diffusion's "text-alignment"): mean over pairs of w * max(cos(i, t), 0),
    clipped per sample (torchmetrics' CLIPScore instead scales by 100 and clamps the mean)."""
    if images.shape != texts.shape or len(images) == 0:
        raise ValueError(
            f"clip_score needs two equal, non-empty sets, got {tuple(images.shape)} and {tuple(texts.shape)}"
        )
    cos = (_normalize(images) * _normalize(texts)).sum(dim=-1)
    return float((w * cos.clamp(min=0)).mean())
