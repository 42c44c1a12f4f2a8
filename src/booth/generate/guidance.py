"""Guidance math applied to the UNet's predictions at each sampling step.

All functions take and return tensors shaped [B, C, H, W]; "prediction" is the model output in its own
parameterisation (epsilon or v). Pure functions, no scheduler state.
"""

from __future__ import annotations

import torch


def composable_cfg(
    uncond: torch.Tensor | list[torch.Tensor], conds: list[torch.Tensor], weights: list, s: float
) -> torch.Tensor:
    """Composable diffusion guidance, x~ = x_u + sum_k w_k * s * (x_c,k - x_u) (Liu et al. 2022; A1111 AND).

    With one sub-prompt of weight 1 this is ordinary classifier-free guidance (Ho & Salimans 2022). With one
    unconditional prediction per sub-prompt (each term from its own model, e.g. composable LoRA), each term
    guides against its own, x~ = x_u,bar + sum_k w_k * s * (x_c,k - x_u,k), x_u,bar the |w|-weighted mean of
    the x_u,k (Liu et al. 2022 compose different models' scores the same way).
    """
    unconds = uncond if isinstance(uncond, list) else [uncond] * len(conds)
    if isinstance(uncond, list):
        shares = [abs(w) + 1e-6 for w in weights]  # all weights 0: the plain mean
        out = sum(a * u for a, u in zip(shares, unconds, strict=True)) / sum(shares)
    else:
        out = uncond.clone()
    for cond, u, w in zip(conds, unconds, weights, strict=True):
        out += (w * s) * (cond - u)
    return out


def image_guidance(
    x_text: torch.Tensor, x_image: torch.Tensor, x_none: torch.Tensor, s_image: float
) -> torch.Tensor:
    """The picture term of InstructPix2Pix guidance (Brooks et al. 2023, eq. 3).

    Given the text-guided prediction x_text = e(c_I, ∅) + s_T (e(c_I, c_T) − e(c_I, ∅)) (`composable_cfg` with
    the picture in every term), returns e(∅, ∅) + s_I (e(c_I, ∅) − e(∅, ∅)) + s_T (e(c_I, c_T) − e(c_I, ∅)),
    where x_image = e(c_I, ∅) and x_none = e(∅, ∅)."""
    return x_text + (s_image - 1.0) * (x_image - x_none)


def rescale_noise_cfg(x_cfg: torch.Tensor, x_pos: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale, eqs. 14-16 of Lin et al. 2023 (arXiv 2305.08891 §3.4); std per sample."""
    dims = list(range(1, x_cfg.ndim))
    sigma_pos = x_pos.std(dim=dims, keepdim=True)
    sigma_cfg = x_cfg.std(dim=dims, keepdim=True)
    x_rescaled = x_cfg * (sigma_pos / sigma_cfg)
    return phi * x_rescaled + (1 - phi) * x_cfg


def dynamic_threshold(x0: torch.Tensor, p: float, c: float = 1.0) -> torch.Tensor:
    """Imagen dynamic thresholding (Saharia et al. 2022, arXiv 2205.11487 §2.3), per sample.

    s = max(percentile_p(|x0|), c);  x0 <- clip(x0, -s, s) * c / s.  With c = 1 this is the paper's rule;
    `c` is the static range, which for latent-space models is the latents' typical range, not 1. Unlike
    diffusers' scheduler option, s has no upper clamp (so the rule is never reduced to static clipping).
    """
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    s = torch.quantile(flat, p, dim=1).clamp(min=c).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) * (c / s)


def prediction_to_x0(
    pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, kind: str
) -> torch.Tensor:
    """x0 from an epsilon or v prediction at a variance-preserving x_t (Salimans & Ho 2022 for v)."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return (x_t - b * pred) / a
    if kind == "v_prediction":
        return a * x_t - b * pred
    raise ValueError(f"unsupported prediction type {kind!r}")


def x0_to_prediction(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of `prediction_to_x0`."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return (x_t - a * x0) / b
    if kind == "v_prediction":
        return (a * x_t - x0) / b
    raise ValueError(f"unsupported prediction type {kind!r}")


def skipped_uncond(params, call: int, calls: int, sigma: float) -> str | None:
    """Whether A1111's CFG denoiser leaves the negative prompt out of this model call, and the infotext key of
    the rule that does: "Skip Early CFG" (option `skip_early_cond`: calls up to that share of the pass) or
    "NGMS" (Negative Guidance minimum sigma, `s_min_uncond`: every other call below that sigma, every call with
    `s_min_uncond_all`). The call then guides against the first prompt's prediction (plain conditional
    sampling for a single prompt): half the UNet rows."""
    if params.skip_early_cond > 0 and call / calls <= params.skip_early_cond:
        return "Skip Early CFG"
    if (call % 2 or params.s_min_uncond_all) and params.s_min_uncond > 0 and sigma < params.s_min_uncond:
        return "NGMS"
    return None
