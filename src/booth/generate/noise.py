"""Initial noise drawn like A1111 with `RNG: CPU`: one CPU generator per image, seeded seed + i.

Noise never depends on the device or on how images are grouped into batches: image i of a batch gets exactly
the noise of a single run with seed + i.
"""

from __future__ import annotations

import torch

from booth.generate.params import resolve_seed  # noqa: F401 - re-exported

MAX_SEED = 2**32 - 1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (A1111 variation seeds, `processing.slerp`)."""
    n0, n1 = v0 / v0.norm(), v1 / v1.norm()
    dot = (n0 * n1).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / so) * v0 + (torch.sin(t * omega) / so) * v1


def _randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def image_noise(
    shape: tuple[int, ...],
    seed: int,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    resize_from: tuple[int, int] | None = None,
):
    """Noise for one image, drawn on the CPU (float32), optionally blended with a variation seed.

    `resize_from` (latent rows, columns): A1111's "Resize seed from": the noise (and variation) is drawn at that
    size and its centre pasted into the centre of the seed's noise at `shape`, so a composition found at one
    size mostly survives at another (`processing.create_random_tensors`)."""
    drawn = (shape[0], *resize_from) if resize_from else tuple(shape)
    noise = _randn(drawn, seed)
    if subseed is not None and subseed_strength > 0:
        noise = slerp(subseed_strength, noise, _randn(drawn, subseed))
    if drawn == tuple(shape):
        return noise
    out = _randn(shape, seed)
    dy, dx = (shape[1] - drawn[1]) // 2, (shape[2] - drawn[2]) // 2
    h, w = min(drawn[1], drawn[1] + 2 * dy), min(drawn[2], drawn[2] + 2 * dx)
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    out[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return out


def batch_noise(
    shape, seeds, subseeds=None, subseed_strength: float = 0.0, resize_from: tuple[int, int] | None = None
) -> torch.Tensor:
    """Stack per-image noise for `seeds` into a [B, *shape] tensor."""
    subseeds = subseeds or [None] * len(seeds)
    return torch.stack(
        [image_noise(shape, s, ss, subseed_strength, resize_from) for s, ss in zip(seeds, subseeds)]
    )


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    """Per-image CPU generators for the sampler's own noise (ancestral / SDE steps)."""
    return [torch.Generator("cpu").manual_seed(s + 0x5EED) for s in seeds]
