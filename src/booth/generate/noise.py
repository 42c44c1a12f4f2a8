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


def image_noise(shape: tuple[int, ...], seed: int, subseed: int | None = None, subseed_strength: float = 0.0):
    """Noise for one image, drawn on the CPU (float32), optionally blended with a variation seed."""
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    if subseed is not None and subseed_strength > 0:
        sub = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(subseed))
        noise = slerp(subseed_strength, noise, sub)
    return noise


def batch_noise(shape, seeds, subseeds=None, subseed_strength: float = 0.0) -> torch.Tensor:
    """Stack per-image noise for `seeds` into a [B, *shape] tensor."""
    subseeds = subseeds or [None] * len(seeds)
    return torch.stack([image_noise(shape, s, ss, subseed_strength) for s, ss in zip(seeds, subseeds)])


def step_generators(seeds: list[int]) -> list[torch.Generator]:
    """Per-image CPU generators for the sampler's own noise (ancestral / SDE steps)."""
    return [torch.Generator("cpu").manual_seed(s + 0x5EED) for s in seeds]
