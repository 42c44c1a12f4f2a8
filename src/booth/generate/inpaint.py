"""Inpainting with any Stable Diffusion model: img2img where a mask says what to redraw (A1111
`StableDiffusionProcessingImg2Img.init` and `modules/masking.py`, `a1111.md` §10).

White in the mask (or, for an RGBA mask with transparency, opaque alpha) is redrawn, black is kept. The steps:
1. the mask is made binary (`create_binary_mask`), optionally inverted, then Gaussian-blurred along x and y;
2. "Whole picture" resizes image and mask to the processing size; "Only masked" (`inpaint_full_res`) crops the
   mask's bounding box (plus padding, widened to the processing aspect), processes that crop at the
   processing size and pastes it back into the full-size picture;
3. the masked area's start: the original (`inpainting_fill` 1), a blur-fill of its surroundings (0), latent
   noise (2) or zero latents (3);
4. while sampling, the kept area of every x_0 prediction is replaced by the original latents, and once more
   after sampling (`blend`);
5. the original pixels outside the (blurred) mask are laid over the decoded image (`apply_overlay`).

Any model inpaints this way; an inpainting model (a 9-channel UNet, e.g. sd-v1-5-inpainting) also reads the mask
and the picture with the masked area hidden at every step (`Engine._image_conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from booth.errors import BoothError
from booth.generate.imageops import resize_image

FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def create_binary_mask(image: Image.Image, round: bool = True) -> Image.Image:
    """An L mask: the alpha channel of an RGBA mask that has transparency, else the luminance; thresholded at
    128 when `round` (A1111 `create_binary_mask`)."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        mask = image.split()[-1].convert("L")
    else:
        mask = image.convert("L")
    return mask.point(lambda v: 255 if v > 128 else 0) if round else mask


def gaussian_blur_1d(mask: Image.Image, sigma: float, axis: int) -> Image.Image:
    """Blur an L image along one axis (1: x, 0: y) as OpenCV's `GaussianBlur` with a kernel of
    2 * int(2.5 sigma + 0.5) + 1 taps along that axis and reflect-101 borders."""
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-((np.arange(-radius, radius + 1)) ** 2) / (2.0 * sigma * sigma))
    taps /= taps.sum()
    array = np.asarray(mask, dtype=np.float64)
    width = [(0, 0), (0, 0)]
    width[axis] = (radius, radius)
    padded = np.pad(array, width, mode="reflect" if array.shape[axis] > radius else "symmetric")
    out = np.zeros_like(array)
    for k, tap in enumerate(taps):
        out += tap * (padded[:, k : k + array.shape[1]] if axis == 1 else padded[k : k + array.shape[0]])
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def crop_region(mask: Image.Image, pad: int = 0) -> tuple[int, int, int, int] | None:
    """The bounding box of the mask's non-zero pixels grown by `pad` (clamped to the image); None when the mask
    is empty (A1111 `get_crop_region_v2`)."""
    box = mask.getbbox()
    if not box or not pad:
        return box
    x1, y1, x2, y2 = box
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(
    region: tuple[int, int, int, int], width: int, height: int, image_width: int, image_height: int
) -> tuple[int, int, int, int]:
    """Widen `region` to the processing aspect width:height, kept inside the image (A1111 `expand_crop_region`)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow_segment(y1, y2, grow, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow_segment(x1, x2, grow, image_width)
    return x1, y1, x2, y2


def _grow_segment(c1: int, c2: int, grow: int, limit: int) -> tuple[int, int]:
    c1, c2 = c1 - grow // 2, c2 + grow - grow // 2
    if c2 >= limit:
        c1, c2 = c1 - (c2 - limit), limit
    if c1 < 0:
        c1, c2 = 0, c2 - c1
    return c1, min(c2, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Fill the masked area with the colours around it: the unmasked image blurred at shrinking radii, laid over
    each other (A1111 `masking.fill`, inpainting_fill 0)."""
    result = Image.new("RGBA", image.size)
    kept = _unmasked(image, mask)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def _unmasked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The picture where the mask is not, transparent where it is (premultiplied RGBa)."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return kept


def apply_overlay(image: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image):
    """Paste a processed crop back at `paste_to` (x, y, w, h) and lay the original's unmasked pixels over it."""
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(image, w, h, 1), (x, y))
        image = base
    image = image.convert("RGBA")
    image.alpha_composite(overlay)
    return image.convert("RGB")


@dataclass
class InpaintJob:
    """The prepared inputs of an inpainting call (`prepare`)."""

    images: list[Image.Image]  # the init images as the sampler starts from them: processing size, filled
    mask: Image.Image  # L, processing size: the prepared mask (an inpainting UNet's mask input)
    latent_mask: Image.Image  # L, processing size: what to redraw, before rounding to the latent grid
    overlays: list[Image.Image]  # RGBA, the original's pixels with the redrawn area transparent
    paste_to: tuple[int, int, int, int] | None  # where an "Only masked" crop goes back (x, y, w, h)
    round: bool
    fill: int
    extra: dict[str, Any] = field(default_factory=dict)  # infotext keys

    def latent_masks(self, shape: tuple[int, ...], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep, redraw) masks of the latent grid `shape` (C, H, W), 1 - each other."""
        c, h, w = shape
        small = self.latent_mask.convert("RGB").resize((w, h))  # PIL's default resampling, as A1111
        redraw = np.asarray(small, dtype=np.float32)[..., 0] / 255.0
        if self.round:
            redraw = np.around(redraw)
        redraw = torch.from_numpy(np.ascontiguousarray(redraw))[None].expand(c, h, w).to(device, dtype)
        return 1.0 - redraw, redraw


def check_inpaint(params: Any) -> None:
    """Raise BoothError for inpainting settings of `params` (a `GenerationParams` with `mask`) that cannot work."""
    if not params.init_images:
        raise BoothError("a mask needs an init image to inpaint (--init-image)")
    if params.inpainting_fill not in FILL_MODES:
        valid = ", ".join(f"{k} ({v})" for k, v in FILL_MODES.items())
        raise BoothError(f"inpainting fill must be one of {valid}, got {params.inpainting_fill}")
    for name in ("mask_blur_x", "mask_blur_y", "inpaint_full_res_padding"):
        if getattr(params, name) < 0:
            raise BoothError(f"{name.replace('_', ' ')} must be at least 0, got {getattr(params, name)}")
    if params.resize_mode == 3:
        raise BoothError("resize mode 3 (latent upscale) does not apply to inpainting: use 0, 1 or 2")
    if params.initial_noise_multiplier < 0:
        raise BoothError(
            f"initial noise multiplier must be at least 0, got {params.initial_noise_multiplier}"
        )


def prepare(params: Any, width: int, height: int) -> InpaintJob:
    """Steps 1-3 for `params` (a `GenerationParams` with `mask`) at the processing size `width` x `height`."""
    extra: dict[str, Any] = {}
    mask = create_binary_mask(params.mask, params.mask_round)
    picture = params.init_images[0].size
    if mask.size != picture:  # a mask drawn at another size: stretched over the picture, so regions line up
        mask = mask.resize(picture, Image.NEAREST if params.mask_round else Image.BILINEAR)
    if params.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
        extra["Mask mode"] = "Inpaint not masked"
    if params.mask_blur_x > 0:
        mask = gaussian_blur_1d(mask, params.mask_blur_x, axis=1)
    if params.mask_blur_y > 0:
        mask = gaussian_blur_1d(mask, params.mask_blur_y, axis=0)
    if params.mask_blur_x > 0 or params.mask_blur_y > 0:
        extra["Mask blur"] = params.mask_blur_x if params.mask_blur_x == params.mask_blur_y else None
    region = paste_to = None
    if params.inpaint_full_res:
        overlay_mask = mask
        region = crop_region(mask, params.inpaint_full_res_padding)
        if region is None:
            raise BoothError("the mask is empty: nothing to inpaint (white marks what to redraw)")
        region = expand_crop_region(region, width, height, mask.width, mask.height)
        x1, y1, x2, y2 = region
        latent_mask = resize_image(mask.crop(region), width, height, 2)
        paste_to = (x1, y1, x2 - x1, y2 - y1)
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = params.inpaint_full_res_padding
    else:
        latent_mask = resize_image(mask, width, height, params.resize_mode)
        doubled = np.clip(np.asarray(latent_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
        overlay_mask = Image.fromarray(doubled)
    image_mask = latent_mask
    if params.latent_mask is not None:
        latent_mask = params.latent_mask.convert("L")
    images, overlays = [], []
    for init in params.init_images:
        image = init.convert("RGB")
        if region is None:
            image = resize_image(image, width, height, params.resize_mode)
        if overlay_mask.size != image.size:
            overlay_mask = resize_image(overlay_mask, image.width, image.height, params.resize_mode)
        overlays.append(_unmasked(image, overlay_mask).convert("RGBA"))
        if region is not None:
            image = resize_image(image.crop(region), width, height, 2)
        if params.inpainting_fill != 1:
            image = fill(image, latent_mask)
        images.append(image)
    if params.inpainting_fill != 1:
        extra["Masked content"] = FILL_MODES[params.inpainting_fill]
    fill_mode = params.inpainting_fill
    return InpaintJob(
        images, image_mask, latent_mask, overlays, paste_to, params.mask_round, fill_mode, extra
    )
