"""The math of one diffusion training step, as short functions named after their papers.

Notation (Ho et al. 2020): z_0 clean latents, eps ~ N(0, I), alpha_bar_t the cumulative product of the noise
schedule, z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021, eq. 1)."""
    alpha_bar = alphas_cumprod.to(t.device)[t].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, eq. 9), for an eps- or v-prediction loss.

    The x_0-loss weight min(SNR, gamma) becomes min(SNR, gamma) / SNR for an eps target and
    min(SNR, gamma) / (SNR + 1) for a v target (the form diffusers' DreamBooth script and kohya use).
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    raise ValueError(f"Min-SNR weights need an epsilon or v_prediction model, not {prediction_type!r}")


def offset_noise(
    shape: tuple[int, ...], strength: float, generator: torch.Generator, device, dtype
) -> torch.Tensor:
    """eps + s * xi with xi ~ N(0, I) constant over each sample's channel (Guttenberg 2023, "offset noise")."""
    eps = torch.randn(shape, generator=generator).to(device, dtype)
    if strength > 0:
        xi = torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator).to(device, dtype)
        eps = eps + strength * xi
    return eps


def pyramid_noise(
    eps: torch.Tensor, iterations: int, discount: float, generator: torch.Generator
) -> torch.Tensor:
    """kohya's multi-resolution noise (`methods.md` §8.4): for i = 0 .. k-1, Gaussian noise drawn at (H, W) / r^i
    with r ~ U(2, 4), upsampled bilinearly and added with weight discount^i; the sum divided by its std."""
    b, c, h, w = eps.shape
    noise = eps.float().clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        draw = torch.randn((b, c, hn, wn), generator=generator).to(noise.device)
        noise += torch.nn.functional.interpolate(draw, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return (noise / noise.std()).to(eps.dtype)


def debiased_weights(snr_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased estimation (`methods.md` §8.2): 1 / sqrt(SNR) for an eps target, 1 / (SNR + 1) for v."""
    if prediction_type == "v_prediction":
        return 1.0 / (snr_t + 1.0)
    return 1.0 / torch.sqrt(snr_t)


def velocity(z_0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 (Salimans & Ho 2022, sec. 4)."""
    a = alpha_bar_t.float().view(-1, *([1] * (z_0.dim() - 1)))
    return (a.sqrt() * eps.float() - (1 - a).sqrt() * z_0.float()).to(z_0.dtype)


def diffusion_target(
    prediction_type: str, z_0: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor
) -> torch.Tensor:
    """What the network is trained to output: eps, or v for v-prediction models."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return velocity(z_0, eps, alpha_bar_t)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def per_sample_mse(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error per sample, in float32; with a mask, sum(mse * mask) / sum(mask) per sample."""
    squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
    dims = tuple(range(1, squared.dim()))
    if mask is None:
        return squared.mean(dim=dims)
    mask = mask.float().expand_as(squared)
    return (squared * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1.0)


def dreambooth_loss(
    per_sample: torch.Tensor, is_prior: torch.Tensor, prior_weight: float, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L = L_inst + lambda * L_prior (Ruiz et al. 2022, eq. 2): both halves of one batch, each a mean.

    `weights` (e.g. Min-SNR) apply to the instance half only, as in diffusers. Returns (L, L_inst, L_prior);
    L_prior is 0 when the batch has no prior samples.
    """
    inst = ~is_prior
    inst_losses = per_sample[inst] * (weights[inst] if weights is not None else 1.0)
    loss_inst = inst_losses.mean()
    if not bool(is_prior.any()):
        return loss_inst, loss_inst.detach(), torch.zeros((), device=per_sample.device)
    loss_prior = per_sample[is_prior].mean()
    return loss_inst + prior_weight * loss_prior, loss_inst.detach(), loss_prior.detach()
