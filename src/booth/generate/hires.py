"""Hires. fix: txt2img at the asked size, upscale, then an img2img pass at the larger size (A1111
`StableDiffusionProcessingTxt2Img.sample_hr_pass`, `a1111.md` §9).

The plan (`plan_hires`) fixes the second pass's size, steps, sampler and prompts before any sampling, so bad
settings fail before the first pass; `upscale_latents` does the latent upscalers; the pixel upscalers
(`booth.generate.upscale`: Lanczos, Nearest, ESRGAN-type models) go through the VAE in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from booth.errors import BoothError

if TYPE_CHECKING:
    from booth.generate.upscale import Upscalers

# A1111 `shared.latent_upscale_modes`: name -> (torch interpolate mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
SAME = (None, "", "Use same sampler", "Use same scheduler")  # the web UI's "same as the first pass" choices


@dataclass(frozen=True)
class HiresPlan:
    """The second pass of one txt2img call."""

    upscale_to: tuple[int, int]  # (x, y) pixels the first pass is upscaled to, before the crop
    truncate: tuple[int, int]  # (x, y) latent columns / rows cropped off, half each side (hr_resize_x and _y)
    width: int  # the final size: (upscale_to - truncate x VAE scale), a multiple of the VAE scale
    height: int
    steps: int  # steps the second pass runs (exactly: A1111 passes them to `setup_img2img_steps`)
    sampler_name: str
    scheduler: str
    prompt: str
    negative_prompt: str
    upscaler: str  # a name of HR_UPSCALERS

    @property
    def latent(self) -> bool:
        """Whether the upscaler works on the latents (else: decode, resize the pixels, encode)."""
        return self.upscaler in LATENT_UPSCALERS

    def schedule(self, denoising_strength: float) -> tuple[int, int]:
        """(steps of the full schedule, t_enc): `steps / strength` steps of which the last `steps` are run
        (A1111 `setup_img2img_steps` with `steps` given)."""
        strength = min(denoising_strength, 0.999)
        return int(self.steps / strength), self.steps - 1


def hires_target(
    width: int, height: int, scale: float, resize_x: int, resize_y: int, vae_scale: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """A1111 `StableDiffusionProcessingTxt2Img.init`: the size the first pass is upscaled to and the latent
    crop. `hr_resize_x` / `_y` of 0 scale by `hr_scale`; one of them keeps the aspect; both cover the box and
    crop the overflow (in latent units)."""
    if not resize_x and not resize_y:
        return (int(width * scale), int(height * scale)), (0, 0)
    if not resize_y:
        return (resize_x, resize_x * height // width), (0, 0)
    if not resize_x:
        return (resize_y * width // height, resize_y), (0, 0)
    if width / height < resize_x / resize_y:
        to = (resize_x, resize_x * height // width)
    else:
        to = (resize_y * width // height, resize_y)
    return to, ((to[0] - resize_x) // vae_scale, (to[1] - resize_y) // vae_scale)


def check_hires(params: Any) -> None:
    """Raise BoothError for hires settings of `params` (a `GenerationParams` with `enable_hr`) that cannot
    work, whatever the model."""
    from booth.generate.samplers import resolve_sampler

    if params.init_images:
        raise BoothError("hires fix is a txt2img pass: it does not apply to img2img (drop --enable-hr)")
    if params.hr_scale <= 0 and not (params.hr_resize_x or params.hr_resize_y):
        raise BoothError(f"hires upscale must be positive, got {params.hr_scale}")
    for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
        if getattr(params, name) < 0:
            raise BoothError(f"{name} must be at least 0, got {getattr(params, name)}")
    for name in ("hr_resize_x", "hr_resize_y"):
        if getattr(params, name) % 8:
            raise BoothError(f"{name} must be a multiple of 8, got {getattr(params, name)}")
    resolve_sampler(*_hires_sampler(params))  # an unknown name fails before the first pass


def check_upscaler(name: str, upscalers: Upscalers) -> None:
    """Raise BoothError unless `name` is a latent upscaler or one of `upscalers` (decode, upscale, encode)."""
    if name in LATENT_UPSCALERS:
        return
    try:
        upscalers.get(name)
    except BoothError:
        valid = ", ".join([*LATENT_UPSCALERS, *upscalers.names()])
        hint = "" if upscalers.dirs else " (model upscalers such as ESRGAN come from --upscaler-dir folders)"
        raise BoothError(f"unknown hires upscaler {name!r}; valid: {valid}{hint}") from None


def _hires_sampler(params: Any) -> tuple[str, str]:
    """The hires pass's (sampler, schedule type): its own, or the first pass's."""
    sampler = params.sampler_name if params.hr_sampler_name in SAME else params.hr_sampler_name
    return sampler, params.scheduler if params.hr_scheduler in SAME else params.hr_scheduler


def plan_hires(params: Any, width: int, height: int, vae_scale: int) -> HiresPlan:
    """Plan the hires pass of `params` (a validated `GenerationParams` with `enable_hr`: `validate` ran
    `check_hires`) at the first pass's `width` x `height`."""
    (to_x, to_y), (cut_x, cut_y) = hires_target(
        width, height, params.hr_scale, params.hr_resize_x, params.hr_resize_y, vae_scale
    )
    final_x, final_y = (to_x // vae_scale - cut_x) * vae_scale, (to_y // vae_scale - cut_y) * vae_scale
    if min(final_x, final_y) < vae_scale or max(final_x, final_y) > 8192:
        raise BoothError(f"the hires size {final_x}x{final_y} must be within {vae_scale}..8192 pixels a side")
    sampler, scheduler = _hires_sampler(params)
    return HiresPlan(
        upscale_to=(to_x, to_y),
        truncate=(cut_x, cut_y),
        width=final_x,
        height=final_y,
        steps=params.hr_second_pass_steps or params.steps,
        sampler_name=sampler,
        scheduler=scheduler,
        prompt=params.hr_prompt or params.prompt,
        negative_prompt=params.hr_negative_prompt or params.negative_prompt,
        upscaler=params.hr_upscaler,
    )


def upscale_latents(latents: torch.Tensor, plan: HiresPlan, vae_scale: int) -> torch.Tensor:
    """A latent upscaler: interpolate to the target's latent size (A1111 `torch.nn.functional.interpolate`)."""
    mode, antialias = LATENT_UPSCALERS[plan.upscaler]
    size = (plan.upscale_to[1] // vae_scale, plan.upscale_to[0] // vae_scale)
    return torch.nn.functional.interpolate(latents.float(), size=size, mode=mode, antialias=antialias).to(
        latents
    )


def crop_latents(latents: torch.Tensor, plan: HiresPlan) -> torch.Tensor:
    """Crop `truncate` latent columns and rows, the smaller half first (A1111 `sample_hr_pass`)."""
    cut_x, cut_y = plan.truncate
    h, w = latents.shape[-2:]
    return latents[..., cut_y // 2 : h - (cut_y + 1) // 2, cut_x // 2 : w - (cut_x + 1) // 2]


def infotext_fields(params: Any, plan: HiresPlan) -> dict[str, Any]:
    """A1111's hires keys (`extra_generation_params`): what differs from the first pass only."""
    fields: dict[str, Any] = {}
    if params.hr_resize_x or params.hr_resize_y:
        fields["Hires resize"] = f"{params.hr_resize_x}x{params.hr_resize_y}"
    else:
        fields["Hires upscale"] = params.hr_scale
    if params.hr_second_pass_steps:
        fields["Hires steps"] = params.hr_second_pass_steps
    fields["Hires upscaler"] = plan.upscaler
    if plan.sampler_name != params.sampler_name:
        fields["Hires sampler"] = plan.sampler_name
    if plan.scheduler != params.scheduler:
        fields["Hires schedule type"] = plan.scheduler
    if plan.prompt != params.prompt:
        fields["Hires prompt"] = plan.prompt
    if plan.negative_prompt != params.negative_prompt:
        fields["Hires negative prompt"] = plan.negative_prompt
    return fields
