"""ControlNet units as A1111's ControlNet extension (sd-webui-controlnet) takes them: a model, a control picture
and its preprocessor, a weight, the share of the sampling it guides, a control mode and a resize mode.

At each model call of a pass whose share done lies in [guidance_start, guidance_end], each unit's ControlNet
reads the noisy latents, the prompt rows and its control picture (resized to the pass's size) and adds its
residuals, times `weight`, to the UNet's skip connections and middle block (Zhang et al. 2023, eq. 2). Control
modes (the extension's): "Balanced" as is; "My prompt is more important" scales residual i of k by
0.825^(k - 1 - i) (the shallow ones least, its soft injection); "ControlNet is more important" does so and
leaves the negative prompt's rows without control (its CFG injection), so guidance pushes towards the control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from booth.errors import BoothError

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # the passes of hires fix a unit guides
RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
SOFT_DECAY = 0.825  # the extension's soft-injection factor per block


def _none(image: Image.Image, unit: ControlUnit) -> Image.Image:
    return image


def _invert(image: Image.Image, unit: ControlUnit) -> Image.Image:
    """White-on-black line art from a black-on-white drawing."""
    from PIL import ImageOps

    return ImageOps.invert(image)


def _cv2(module: str):
    try:
        import cv2
    except ImportError:
        raise BoothError(
            f"the {module} preprocessor needs OpenCV: pip install opencv-python-headless (or give the control map "
            "with the preprocessor none)"
        ) from None
    return cv2


def _canny(image: Image.Image, unit: ControlUnit) -> Image.Image:
    """OpenCV's Canny edges (thresholds A and B, low and high), at the processor resolution."""
    cv2 = _cv2("canny")
    small = _at_resolution(image, unit.processor_res)
    edges = cv2.Canny(np.asarray(small), int(unit.threshold_a), int(unit.threshold_b))
    return Image.fromarray(edges).convert("RGB")


def _threshold(image: Image.Image, unit: ControlUnit) -> Image.Image:
    """White where the grey value is above threshold A, black elsewhere, at the processor resolution."""
    grey = np.asarray(_at_resolution(image, unit.processor_res).convert("L"))
    return Image.fromarray(np.where(grey > unit.threshold_a, 255, 0).astype(np.uint8)).convert("RGB")


def _tile_resample(image: Image.Image, unit: ControlUnit) -> Image.Image:
    """The picture down-sampled by threshold A (the tile ControlNet's input: detail to add back)."""
    rate = max(1.0, float(unit.threshold_a))
    w, h = image.size
    return image.resize((max(1, round(w / rate)), max(1, round(h / rate))), Image.Resampling.BOX)


def _blur_gaussian(image: Image.Image, unit: ControlUnit) -> Image.Image:
    """OpenCV's Gaussian blur of sigma threshold A, at the processor resolution."""
    cv2 = _cv2("blur_gaussian")
    small = np.asarray(_at_resolution(image, unit.processor_res))
    return Image.fromarray(cv2.GaussianBlur(small, (0, 0), float(unit.threshold_a)))


PREPROCESSORS = {
    "none": _none,
    "invert": _invert,
    "canny": _canny,
    "threshold": _threshold,
    "tile_resample": _tile_resample,
    "blur_gaussian": _blur_gaussian,
    "reference_only": _none,  # no ControlNet model: the picture steers self-attention (`booth.generate.reference`)
}
REFERENCE_MODULES = ("reference_only",)
# the extension's defaults of threshold A / B per preprocessor (the API's -1); the others take none
THRESHOLDS = {
    "canny": (100.0, 200.0),
    "threshold": (127.0, None),
    "tile_resample": (1.0, None),
    "blur_gaussian": (9.0, None),
    "reference_only": (0.5, None),  # style fidelity
}
ALIASES = {"invert (from white bg & black line)": "invert"}  # the extension's full labels


def _at_resolution(image: Image.Image, resolution: int) -> Image.Image:
    """`image` with its short side at `resolution` (the extension's processor resolution; -1 or 0: as is)."""
    if resolution <= 0:
        return image
    w, h = image.size
    scale = resolution / min(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


@dataclass
class ControlUnit:
    """One ControlNet unit (the extension's `ControlNetUnit` fields, as its API names them)."""

    model: str  # a name of the ControlNet folders ("name [hash]" accepted) or a path
    image: Any  # PIL image: the control picture
    module: str = "none"  # the preprocessor (`PREPROCESSORS`)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = "Crop and Resize"
    processor_res: int = 512
    threshold_a: float | None = None  # None: the preprocessor's default (`THRESHOLDS`)
    threshold_b: float | None = None
    pixel_perfect: bool = False
    hr_option: str = "Both"  # with hires fix: the passes the unit guides (`HR_OPTIONS`)

    def __post_init__(self) -> None:
        self.module = ALIASES.get(self.module, self.module)
        a, b = THRESHOLDS.get(self.module, (None, None))
        self.threshold_a = a if self.threshold_a is None or self.threshold_a < 0 else self.threshold_a
        self.threshold_b = b if self.threshold_b is None or self.threshold_b < 0 else self.threshold_b
        if self.processor_res is None or self.processor_res < 0:
            self.processor_res = 512

    def validate(self) -> ControlUnit:
        if self.image is None:
            raise BoothError(f"ControlNet {self.model}: no control picture")
        if self.module not in PREPROCESSORS:
            raise BoothError(
                f"ControlNet preprocessor {self.module!r} is not in booth; choose one of {', '.join(PREPROCESSORS)}"
            )
        if self.control_mode not in CONTROL_MODES:
            raise BoothError(f"control mode {self.control_mode!r}: choose one of {', '.join(CONTROL_MODES)}")
        if self.hr_option not in HR_OPTIONS:
            raise BoothError(f"hr option {self.hr_option!r}: choose one of {', '.join(HR_OPTIONS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise BoothError(f"resize mode {self.resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise BoothError(
                f"ControlNet guidance start / end must satisfy 0 <= start <= end <= 1, got "
                f"{self.guidance_start} / {self.guidance_end}"
            )
        if not 0.0 <= self.weight <= 2.0:
            raise BoothError(f"ControlNet weight must be in [0, 2], got {self.weight}")
        return self

    def detected_map(self) -> Image.Image:
        """The control picture after its preprocessor (what the ControlNet reads)."""
        return PREPROCESSORS[self.module](self.image.convert("RGB"), self).convert("RGB")

    def infotext(self, title: str) -> str:
        """The extension's PNG-info value of this unit (`ControlNet N: "..."`)."""
        fields = {
            "Module": self.module,
            "Model": title,
            "Weight": self.weight,
            "Resize Mode": self.resize_mode,
            "Processor Res": self.processor_res,
            "Threshold A": self.threshold_a,  # left out where the preprocessor takes none
            "Threshold B": self.threshold_b,
            "Guidance Start": self.guidance_start,
            "Guidance End": self.guidance_end,
            "Pixel Perfect": self.pixel_perfect,
            "Control Mode": self.control_mode,
        }
        return ", ".join(f"{k}: {_text(v)}" for k, v in fields.items() if v is not None)


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def control_hint(unit: ControlUnit, width: int, height: int):
    """The unit's detected map at the pass's size as a (1, 3, H, W) tensor in [0, 1], resized by its resize
    mode (A1111's: stretch, crop to the aspect then resize, or fit inside and fill the rest with black): a torch
    tensor."""
    from booth.generate.imageops import resize_image

    mode = RESIZE_MODES.index(unit.resize_mode)
    if unit.pixel_perfect:
        unit.processor_res = pixel_perfect_resolution(unit.image.size, width, height, mode)
    picture = unit.detected_map()
    if mode == 2:  # fit inside, black around (control maps are black where there is nothing)
        scale = min(width / picture.width, height / picture.height)
        inner = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
            Image.Resampling.LANCZOS,
        )
        sized = Image.new("RGB", (width, height))
        sized.paste(inner, ((width - inner.width) // 2, (height - inner.height) // 2))
    else:
        sized = resize_image(picture, width, height, mode)
    import torch

    array = np.asarray(sized, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, mode: int) -> int:
    """The extension's "Pixel Perfect" processor resolution: the picture's short side scaled as the resize mode
    will scale it to the pass's size (fit inside for Resize and Fill, cover otherwise)."""
    raw_w, raw_h = size
    scales = (height / raw_h, width / raw_w)
    scale = min(scales) if mode == 2 else max(scales)
    return int(round(scale * min(raw_w, raw_h)))


def soft_scales(count: int, mode: str) -> list[float]:
    """Per-residual factors (skip connections from the shallowest, then the middle block) of a control mode."""
    if mode == "Balanced":
        return [1.0] * count
    return [SOFT_DECAY ** float(count - 1 - i) for i in range(count)]


def active(unit: ControlUnit, step: int, steps: int) -> bool:
    """Whether the unit guides sampling step `step` (0-based) of `steps` (the extension: step / steps in
    [guidance_start, guidance_end])."""
    done = step / steps
    return unit.guidance_start <= done <= unit.guidance_end


__all__ = [
    "CONTROL_MODES",
    "PREPROCESSORS",
    "RESIZE_MODES",
    "ControlUnit",
    "active",
    "control_hint",
    "soft_scales",
]
